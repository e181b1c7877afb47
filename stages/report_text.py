"""report.md from the report dict: the tables a paper's appendix would hold."""

from __future__ import annotations


def _pct(s: dict) -> str:
    if not s.get("n"):
        return "n/a (0 questions)"
    lo, hi = s["ci95"]
    return f"{s['k']}/{s['n']} = {100 * s['rate']:.1f}% (95% CI {100 * lo:.1f}-{100 * hi:.1f}%)"


def render_markdown(r: dict) -> str:
    st, un, rb = r["steer"], r["unsteered"], r["random_baseline"]
    lines = [
        f"# Colour swap by steering: {r['model']}",
        "",
        f"Direction: {r['direction']['method']} of {r['direction']['contrast'][0]} minus "
        f"{r['direction']['contrast'][1]} (last-token residual stream, "
        f"{r['direction']['n_pos']} + {r['direction']['n_neg']} questions). "
        f"Steering: mode {st['mode']}, layer(s) {st['layers']}, alpha {st['alpha']}, "
        f"positions {st.get('positions', 'all')}, "
        f"scorer `{st['scorer']}`, {st['n_random']} random directions of equal norm.",
        "",
        "## Unsteered baseline",
        "",
        "| class | questions | right (logit: prefers own word) | right (greedy answer) |",
        "| --- | --- | --- | --- |",
    ]
    for cond, c in un["per_class"].items():
        lines.append(
            f"| {cond} | {c['n']} | {c['unsteered_right_logit']} | "
            f"{c['unsteered_right_generate']} |"
        )
    lines += [
        "",
        f"Denominator of the main swap rate: the {un['n_answered_right']} of {un['n_questions']} "
        f"questions answered right unsteered (by `{un['right_by']}`).",
        "",
        "## Result",
        "",
        "| measure | this run | original study (Qwen2.5-7B-4bit) |",
        "| --- | --- | --- |",
        f"| swap rate, answered right unsteered | {_pct(r['swap']['answered_right'])} | "
        f"{r['original_study']['swap']} |",
        f"| swap rate, all questions | {_pct(r['swap']['all'])} | |",
    ]
    for cond, c in un["per_class"].items():
        lines.append(
            f"| {cond} -> {c['target']} (answered right) | {_pct(c['swap_answered_right'])} | |"
        )
    lines.append(
        f"| bidirectional swap (the lower of the two class rates) | "
        f"{100 * r['bidirectional_swap']:.1f}% | |"
    )
    t = rb["answered_right"]
    lines.append(
        f"| random directions (mean +- sd) | {100 * t['random_mean']:.1f}% +- "
        f"{100 * t['random_sd']:.1f}% | {r['original_study']['random']} |"
    )
    floor = " (floored: no random swaps)" if t["p0_floored"] else ""
    lines.append(
        f"| exact binomial test vs random rate p0 = {t['p0']:.4f}{floor} | "
        f"p = {t['binomial_p']:.3g} | p = {r['original_study']['binomial_p']:.2g} |"
    )
    c = r["controls"]
    if "generate_bleed" in c:
        lines.append(
            f"| control bleed (greedy answer now names a swap colour) | "
            f"{_pct(c['generate_bleed'])} | {r['original_study']['controls_bleed']} |"
        )
    if "logit_top_token_changed" in c:
        lines.append(
            f"| controls whose first answer token changed | "
            f"{_pct(c['logit_top_token_changed'])} | |"
        )
    if r["confirm"].get("n"):
        cf = r["confirm"]
        lines.append(
            f"| generation check on a sample: greedy answer names the target | "
            f"{_pct(cf['generate_swap'])}; agrees with logit verdict on "
            f"{100 * cf['agreement']:.0f}% | |"
        )
    lines += [
        "",
        "## Examples (greedy, steered)",
        "",
        "| prompt | class | unsteered | steered |",
        "| --- | --- | --- | --- |",
    ]
    for e in r["examples"]:
        lines.append(
            f"| {e['prompt_id']} | {e['condition']} | {_cell(e['unsteered'])} | "
            f"{_cell(e['steered'])} |"
        )
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in r.get("plots", [])]
    lines += [
        "",
        "Swap (logit scorer): at the answer position the steered model gives the "
        "target colour's first token a higher logit than the original colour's. "
        "Intervals are Wilson 95%; the binomial test is one-sided (greater) against "
        "the mean swap rate of the random directions on the same questions.",
        "",
    ]
    return "\n".join(lines)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ").strip() or "(empty)"
