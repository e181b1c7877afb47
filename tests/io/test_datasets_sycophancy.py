"""The sycophancy-suite prompt files: schema, counts per condition, pairing, rubric lengths."""

import json
from collections import Counter

import pytest

from mlx_interp.io.datasets import PROJECT_ROOT, read_jsonl

DATA = PROJECT_ROOT / "datasets"
THREE_WAY = ("SyA", "GA", "SyPr", "neutral")
CONFOUND = (
    "direct_pressure",
    "neutral_question",
    "third_party_emotion",
    "clinical_pressure",
    "irrelevant_emotion",
    "bare_question",
)
DOMAINS = (
    "self_reflection",
    "technical_diagnosis",
    "ambiguous_directive",
    "ethical_tradeoff",
    "knowledge_boundary",
)
MAX_WORDS = 90


def load(name):
    df = read_jsonl(DATA / name)
    meta = df["meta"].map(json.loads)
    return df, meta


def words(s):
    return len(s.split())


def check_common(df, meta, keys):
    """Unique ids and texts, every named meta key present, no empty strings anywhere."""
    assert df["id"].is_unique
    assert df["text"].is_unique
    for m in meta:
        assert set(keys) <= set(m), f"missing {set(keys) - set(m)}"
        for v in m.values():
            assert not (isinstance(v, str) and not v.strip())
    assert all(t.strip() and words(t) <= MAX_WORDS for t in df["text"])


def test_three_way():
    df, meta = load("sycophancy_3way.jsonl")
    check_common(df, meta, ("response", "topic", "pair"))
    assert Counter(df["condition"]) == {c: 40 for c in THREE_WAY}
    prefix = {"SyA": "sya", "GA": "ga", "SyPr": "sypr", "neutral": "neutral"}
    for cond in THREE_WAY:
        rows = df["condition"] == cond
        pairs = [meta[i]["pair"] for i in df.index[rows]]
        assert sorted(pairs) == list(range(40))
        for i in df.index[rows]:
            assert df.at[i, "id"] == f"{prefix[cond]}-{meta[i]['pair']:02d}"
    responses = [m["response"] for m in meta]
    assert len(set(responses)) == len(responses)
    assert all(words(r) <= MAX_WORDS for r in responses)
    # SyA item k and GA item k share a topic, and the two conditions match in length
    by = {(df.at[i, "condition"], meta[i]["pair"]): meta[i] for i in df.index}
    assert all(by["SyA", k]["topic"] == by["GA", k]["topic"] for k in range(40))

    def mean_words(cond, field):
        vals = [
            words(df.at[i, "text"] if field == "text" else meta[i][field])
            for i in df.index[df["condition"] == cond]
        ]
        return sum(vals) / len(vals)

    for field in ("text", "response"):
        a, b = mean_words("SyA", field), mean_words("GA", field)
        assert abs(a - b) / max(a, b) < 0.1, (field, a, b)


def test_confound_pairing():
    df, meta = load("sycophancy_confound.jsonl")
    check_common(df, meta, ("claim_id", "question", "truth"))
    assert Counter(df["condition"]) == {c: 36 for c in CONFOUND}
    claims = {}
    for i in df.index:
        cond, m = df.at[i, "condition"], meta[i]
        assert df.at[i, "id"] == f"{cond}-{m['claim_id']:02d}"
        assert m["question"].lower() in df.at[i, "text"].lower()
        assert isinstance(m["truth"], bool)
        claims.setdefault(m["claim_id"], []).append((cond, m["question"], m["truth"]))
    assert sorted(claims) == list(range(36))
    for cid, entries in claims.items():
        assert sorted(c for c, _, _ in entries) == sorted(CONFOUND), cid
        assert len({(q, t) for _, q, t in entries}) == 1, cid
    questions = [entries[0][1] for entries in claims.values()]
    assert len(set(questions)) == 36
    truths = Counter(entries[0][2] for entries in claims.values())
    assert truths[True] >= 12 and truths[False] >= 12
    bare = df[df["condition"] == "bare_question"]
    assert all(words(t) <= 20 for t in bare["text"])
    # framing sentences vary: at least 8 distinct framings in every framed condition
    for cond in CONFOUND[:-1]:
        rows = df.index[df["condition"] == cond]
        frames = {
            df.at[i, "text"].lower().replace(meta[i]["question"].lower(), "{q}") for i in rows
        }
        assert len(frames) >= 8, cond


def test_rubric_contamination_prompts():
    df, meta = load("rubric_contamination.jsonl")
    check_common(df, meta, ("domain",))
    assert Counter(df["condition"]) == {d: 24 for d in DOMAINS}
    assert all(m["domain"] == c for m, c in zip(meta, df["condition"], strict=True))


def test_rubrics():
    rubrics = json.loads((DATA / "rubrics.json").read_text(encoding="utf-8"))
    assert sorted(rubrics) == sorted(DOMAINS)
    counts = {d: words(r) for d, r in rubrics.items()}
    assert all(60 <= n <= 90 for n in counts.values()), counts
    mean = sum(counts.values()) / len(counts)
    assert all(abs(n - mean) / mean <= 0.15 for n in counts.values()), counts
    assert len(set(rubrics.values())) == len(rubrics)


@pytest.mark.parametrize(
    "name", ["sycophancy_3way.jsonl", "sycophancy_confound.jsonl", "rubric_contamination.jsonl"]
)
def test_plain_json_lines(name):
    """One object per line, no blank lines, UTF-8 (read_jsonl skips blanks; keep the files tidy)."""
    lines = (DATA / name).read_text(encoding="utf-8").splitlines()
    assert lines and all(line.strip() for line in lines)
    assert all(isinstance(json.loads(line), dict) for line in lines)
