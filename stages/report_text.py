"""report.md from the report dict: the tables a paper's appendix would hold."""

from __future__ import annotations

from mlx_interp.stages.report_sections import headline_lines, setting_lines


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
        f"{r['direction']['contrast'][1]} ("
        f"{r['direction'].get('measured_at', 'residual after each layer at the last token')}, "
        f"{r['direction']['n_pos']} + {r['direction']['n_neg']} rows, fitted on split "
        f"`{r['direction'].get('fit_split', 'all')}`). "
        f"Steering: mode {st['mode']}, layer(s) {st['layers']}, alpha {st['alpha']}, "
        f"positions {st.get('positions', 'all')}, "
        f"scorer `{st['scorer']}`, {st['n_random']} random directions of equal norm.",
        *setting_lines(st),
        *headline_lines(r),
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
        f"Questions counted: split `{r.get('evaluated_on', 'all')}`"
        + (
            " (held out: not used to fit the direction or choose the setting)."
            if r.get("evaluated_on") == "test"
            else "."
        ),
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
    per_layer = r.get("direction", {}).get("per_layer", {})
    separable = [per_layer[str(k)]["cv_accuracy"] for k in st["layers"] if str(k) in per_layer]
    if separable and "Reflect" in str(st.get("mode", "")):
        lines.append(
            "| fitted questions on their own side of the direction at the steered layer (5-fold "
            "CV accuracy along it; a reflection pushes the others further into their own colour, "
            f"so this bounds the swap) | {100 * max(separable):.1f}% | |"
        )
    t = rb["answered_right"]
    if t["random_rates"]:
        lines.append(
            f"| random directions (mean +- sd) | {100 * t['random_mean']:.1f}% +- "
            f"{100 * t['random_sd']:.1f}% | {r['original_study']['random']} |"
        )
        floor = " (floored: no random swaps)" if t["p0_floored"] else ""
        lines.append(
            f"| exact binomial test vs random rate p0 = {t['p0']:.4f}{floor} | "
            f"p = {t['binomial_p']:.3g} | p = {r['original_study']['binomial_p']:.2g} |"
        )
    else:
        lines.append(
            "| random directions | none run (steer.n_random=0): no baseline rate, no test | "
            f"{r['original_study']['random']} |"
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
    long = (r.get("fluency") or {}).get("long", {})
    if long.get("steered", {}).get("n"):
        un = long["unsteered"]
        lines.append(
            f"| loop rate of open-ended answers, steered (unsteered) | "
            f"{_pct(long['steered']['loop'])} ({_pct(un['loop']) if un.get('n') else 'n/a'}) | |"
        )
    lines += _fluency_lines(r)
    lines += _held_out_lines(r)
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
    if r.get("long_examples"):
        lines += [
            "",
            "## Examples (open-ended answers, greedy; [loop] = ends in a loop)",
            "",
            "| prompt | unsteered | steered |",
            "| --- | --- | --- |",
        ]
        for e in r["long_examples"]:
            lines.append(
                f"| {e['prompt_id']} | {_loop_tag(e['unsteered_loop'])}{_cell(e['unsteered'])} | "
                f"{_loop_tag(e['steered_loop'])}{_cell(e['steered'])} |"
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


def _held_out_lines(r: dict) -> list[str]:
    """Held-out (test) numbers beside the in-sample (train) ones."""
    ins = r.get("in_sample")
    if not ins:
        return []
    rb = r["random_baseline"]["answered_right"]["random_mean"]
    lines = [
        "",
        "## Held out beside in-sample",
        "",
        "| measure | held out (test) | in-sample (train: fitted and chosen on) |",
        "| --- | --- | --- |",
        f"| bidirectional swap | {_num(r['bidirectional_swap'], True)} | "
        f"{_num(ins['bidirectional_swap'], True)} |",
    ]
    for cond, c in r["unsteered"]["per_class"].items():
        got = ins["per_class"].get(cond, {"n": 0})
        lines.append(
            f"| {cond} -> {c['target']} (answered right) | {_pct(c['swap_answered_right'])} | "
            f"{_pct(got)} |"
        )
    lines.append(
        f"| random directions (mean) | {_num(rb, True)} | {_num(ins['random_mean'], True)} |"
    )
    for key, name in (
        ("logit_top_became_target_word", "control bleed (top token became a swap colour)"),
        ("generate_bleed", "control bleed (greedy answer names a swap colour)"),
    ):
        if key in r["controls"]:
            other = ins["controls"].get(key, {"n": 0})
            lines.append(f"| {name} | {_pct(r['controls'][key])} | {_pct(other)} |")
    long = (r.get("fluency") or {}).get("long", {}).get("steered", {})
    if long.get("n"):
        lines.append(
            f"| loop rate of open-ended answers | {_pct(long['loop'])} | "
            f"{_pct(ins['loop']) if ins.get('loop') else 'n/a'} |"
        )
    return lines


def render_localization(r: dict) -> str:
    """localization.md: logit lens and patching, and the single-site ceiling."""
    loc = r["localization"]
    lines = [
        f"# Where the colour is decided: {r['model']}",
        "",
        "Logit lens: each layer's residual through the final norm and unembedding; the logit "
        "of the question's own colour minus the other's, mean over the questions (positive: "
        "the right colour leads). Roles: the object's last token, the tokens after it, the last "
        "token.",
        "",
        "| role | at the last layer | largest (layer) | first layer > 0 |",
        "| --- | --- | --- | --- |",
    ]
    for role, v in loc["lens"].items():
        lines.append(
            f"| {role} | {v['final_layer_mean']:.2f} | {v['max_mean']:.2f} ({v['max_layer']}) | "
            f"{v['first_positive_layer']} |"
        )
    p = loc["patching"]
    best, steered = p["best_site"], p["steered_site"]
    lines += [
        "",
        f"Activation patching: {p['n_pairs']} clean/corrupted pairs of one template (logit "
        f"difference clean {p['ld_clean_mean']:.2f}, corrupted {p['ld_corrupt_mean']:.2f}); the "
        "clean residual after one layer at one role patched into the corrupted run.",
        "",
        "| site | share of the logit difference recovered |",
        "| --- | --- |",
    ]
    if best:
        lines.append(
            f"| best single role: layer {best['layer']}, {best['role']} | "
            f"{_num(best['recovery'], True)} |"
        )
    if steered["recovery"] is not None:
        lines.append(
            f"| the steered site: layer(s) {steered['layers']}, {steered['role']} (ceiling of "
            f"an edit there) | {_num(steered['recovery'], True)} |"
        )
    lines.append(
        f"| steering there (bidirectional swap, split `{r['evaluated_on']}`) | "
        f"{_num(r['bidirectional_swap'], True)} |"
    )
    names = {"attn": "attention output", "mlp": "MLP output"}
    for kind, top in p.get("best_by_site", {}).items():
        if kind != "resid":
            lines.append(
                f"| best {names.get(kind, kind)} (clean output of one block at one role): "
                f"layer {top['layer']}, {top['role']} | {_num(top['recovery'], True)} |"
            )
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in r.get("plots", [])] + [""]
    return "\n".join(lines)


def _num(value: float, pct: bool = False) -> str:
    if value is None or value != value:
        return "n/a"
    return f"{100 * value:.1f}%" if pct else f"{value:.3f}"


def _loop_tag(flag) -> str:
    return "[loop] " if flag else ""


def _fluency_lines(r: dict) -> list[str]:
    """The fluency table: loop rate, repetition and distinct-n, steered beside unsteered."""
    fl = r.get("fluency") or {}
    if not fl:
        return []
    spec = r["steer"].get("fluency", {})
    lines = [
        "",
        "## Fluency",
        "",
        "Every generation's token ids are scored (mlx_interp.analysis.fluency): a generation "
        f"is a loop when it ends in at least {spec.get('min_repeats', '?')} copies of a cycle "
        f"of at most {spec.get('max_period', '?')} tokens. Long answers: "
        f"{spec.get('n_prompts', '?')} swap questions answered open-ended "
        f"({spec.get('max_tokens', '?')} tokens, "
        f"`{spec.get('instruction', '')}`); short answers: the generation check above.",
        "",
        f"| generations | n | loop rate | repeated {spec.get('ngram', 3)}-gram share | "
        "distinct-1 | distinct-2 | longest repeat (tokens) | mean tokens | names the target |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    names = {"long": "long answers", "short": "short answers"}
    for key, sides in fl.items():
        for side in ("unsteered", "steered"):
            f = sides[side]
            if not f.get("n"):
                continue
            lines.append(
                f"| {names[key]}, {side} | {f['n']} | {_pct(f['loop'])} | "
                f"{_num(f['repeated_ngram_share'])} | {_num(f['distinct_1'])} | "
                f"{_num(f['distinct_2'])} | {f['longest_repeat']:.1f} | "
                f"{f['n_tokens']:.1f} | {_pct(f['names_target'])} |"
            )
    return lines


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ").strip() or "(empty)"
