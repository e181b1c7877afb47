"""The library in a few lines: load a model, record activations, train a direction, steer.

    import mlx_interp as mi

    model = mi.load("smollm2_135m")  # a conf/model name, a .gguf file, an mlx-lm folder or hub id
    cache = model.record(["Grass is", "Fire trucks are"], sites=["resid_post"], layers=[8, -1])
    cache["resid_post", 8].shape  # (2, 576): the last token of each prompt
    direction = mi.Direction.train(model, ["I love this"], ["I hate this"], layers=[8])
    with direction.apply(model, alpha=4.0, mode="add"):
        print(model.generate("Tell me about your day."))
    direction.save("love.safetensors")

The same functions run the pipeline's stages (capture, directions, steering): this module
only holds them together. Sites speak one naming scheme (:mod:`mlx_interp.interventions.sites`):
``layers.8.mlp``, TransformerLens's ``blocks.8.hook_mlp_out``, or ``("mlp_out", 8)``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_interp.analysis.directions import DirectionSet, extract
from mlx_interp.errors import ConfigError, MlxInterpError
from mlx_interp.interventions.cache_run import run_with_cache
from mlx_interp.interventions.capture import POSITIONS
from mlx_interp.interventions.edits import SiteEdit, edit_sites, steer_sites
from mlx_interp.interventions.site_hooks import KEY_AXIS_KINDS
from mlx_interp.interventions.sites import (
    KINDS,
    Site,
    SiteError,
    capture_sites_batch,
    kind_of,
    parse_site,
    resolve_sites,
)
from mlx_interp.interventions.steering import LayerEdit, steer
from mlx_interp.interventions.token_positions import row_lengths
from mlx_interp.io.control_vectors import export_control_vector, import_control_vector
from mlx_interp.io.prompts import render
from mlx_interp.models.anatomy import Anatomy, anatomy_of
from mlx_interp.models.loading import LoadedModel, load_model, model_config

__all__ = ["ActivationCache", "Direction", "Model", "load"]

_ALL_KINDS = ("embed", *(k for k in KINDS if k not in ("embed", "logits")), "logits")


class Model:
    """A loaded model and its tokenizer, ready to record, steer and generate.

    Attributes: ``model`` (the mlx-lm module), ``tokenizer`` (mlx-lm's wrapper), ``name``,
    ``n_layers`` and ``d_model``.
    """

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.model, self.tokenizer, self.name = loaded.model, loaded.tokenizer, loaded.name
        self.n_layers, self.d_model = loaded.n_layers, loaded.d_model

    def __repr__(self) -> str:
        return f"Model({self.name!r}, n_layers={self.n_layers}, d_model={self.d_model})"

    @property
    def anatomy(self) -> Anatomy:
        """Where the model's parts are: layers, attention, MLP, norms, head
        (:class:`~mlx_interp.models.anatomy.Anatomy`; ``anatomy.layer(8).o_proj``...)."""
        return anatomy_of(self.model)

    def tokens(self, text: str, chat: bool | None = False) -> list[int]:
        """Token ids of ``text``; with ``chat`` inside the model's chat template (a user turn).

        ``chat=None`` follows the model's prompt format: chat for instruction-tuned models,
        plain text for base models without a chat template (``model.prompt_format``).
        """
        if chat is None:
            chat = self.loaded.prompt_format == "chat"
        return render(self.tokenizer, text, "chat" if chat else "plain", None, [])[1]

    def record(
        self,
        prompts: str | Sequence[str],
        sites: Any = "resid_post",
        layers: Sequence[int] | int | None = None,
        positions: str = "last",
        chat: bool = False,
        batch_size: int = 16,
    ) -> ActivationCache:
        """Activations of ``prompts`` at ``sites``.

        ``sites`` are full names (``layers.8.mlp``, ``blocks.8.hook_mlp_out``,
        ``("mlp_out", 8)``) or kinds (``resid_post``, ``attn_out``, ``mlp_out``, ``z``)
        taken at every layer in ``layers`` (None: all; negative counts from the end).
        ``positions``: ``last`` token, ``mean`` over tokens, or ``all`` tokens.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ConfigError("record needs a non-empty list of non-empty prompt strings")
        if positions not in POSITIONS:
            raise ConfigError(f"positions must be one of {', '.join(POSITIONS)}, not {positions!r}")
        chosen = resolve_sites(self.model, self._site_names(sites, layers))
        keyed = [site.name for site in chosen if site.kind in KEY_AXIS_KINDS]
        if keyed:
            raise ConfigError(
                f"record keeps one vector per prompt and position; {keyed[0]} has one value "
                "per key token: use model.run_with_cache(prompts, sites=...) for patterns"
            )
        seqs = [self.tokens(p, chat) for p in prompts]
        parts: dict[str, list] = {site.name: [] for site in chosen}
        for start in range(0, len(seqs), batch_size):
            got = capture_sites_batch(
                self.model, seqs[start : start + batch_size], chosen, positions, self.loaded.pad_id
            )
            for name, value in got.items():
                parts[name].extend(value)
        values = {
            site: parts[site.name] if positions == "all" else np.stack(parts[site.name])
            for site in chosen
        }
        return ActivationCache(values, prompts, positions, self.n_layers)

    def _site_names(self, sites: Any, layers: Sequence[int] | int | None) -> list:
        one_pair = isinstance(sites, tuple) and len(sites) == 2 and isinstance(sites[1], int)
        if isinstance(sites, (str, Site)) or one_pair:
            sites = [sites]
        picked = list(range(self.n_layers)) if layers is None else layers
        picked = [picked] if isinstance(picked, int) else list(picked)
        names: list = []
        for site in sites:
            kind = kind_of(site)
            if kind in ("embed", "logits"):
                names.append(site)
            elif kind is not None:
                names += [Site(layer, kind) for layer in picked]
            else:
                names.append(site)
        return names

    def _sequences(self, prompts: Any, chat: bool | None) -> list[list[int]]:
        """Token ids of one prompt or a list: text (in the chat template with ``chat``) or
        token ids as given."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], (int, np.integer))):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ConfigError("give at least one prompt (text or a list of token ids)")
        seqs = []
        for prompt in prompts:
            if isinstance(prompt, str) and prompt.strip():
                seqs.append(self.tokens(prompt, chat))
            elif (
                not isinstance(prompt, str)
                and len(prompt)
                and all(isinstance(t, (int, np.integer)) for t in prompt)
            ):
                seqs.append([int(t) for t in prompt])
            else:
                raise ConfigError(f"a prompt is non-empty text or token ids, not {prompt!r}")
        return seqs

    def run_with_cache(
        self,
        prompts: Any,
        sites: Any = None,
        layers: Sequence[int] | int | None = None,
        positions: Any = "all",
        chat: bool | None = False,
        as_numpy: bool = False,
    ) -> tuple[Any, ActivationCache]:
        """One right-padded forward of ``prompts``: ``(logits, cache)``.

        ``prompts``: text, token ids, or a list of either. ``sites``: names or kinds as in
        :meth:`record` (kinds at every layer in ``layers``); None records every kind.
        ``positions``: ``all`` (``[batch, seq, ...]``, pad tokens NaN: each row's real length
        is ``cache.lengths``), ``last`` (each row's last token: ``[batch, ...]``), an int, a
        list of ints (negative counts from each row's end) or one list per row. The logits
        are ``[batch, max_len, vocab]`` with pad tokens NaN.

        Values are ``mx.array`` by default: they go straight back into the model (an edit,
        a patch) and into MLX maths without a copy; ``as_numpy=True`` gives float32 numpy
        arrays (``np.asarray`` of an mx value also works).
        """
        names = self._site_names(sites if sites is not None else list(_ALL_KINDS), layers)
        seqs = self._sequences(prompts, chat)
        logits, values, lengths = run_with_cache(
            self.model, seqs, names, positions, self.loaded.pad_id, as_numpy
        )
        return logits, ActivationCache(values, seqs, positions, self.n_layers, lengths)

    def to_str_tokens(self, prompt: Any, chat: bool | None = False) -> list:
        """Each token of ``prompt`` (text or ids; a list of them gives a list) as text."""
        if not isinstance(prompt, str) and prompt and not isinstance(prompt[0], (int, np.integer)):
            return [self.to_str_tokens(p, chat) for p in prompt]
        ids = self._sequences(prompt, chat)[0]
        return [self.tokenizer.decode([i]) for i in ids]

    @contextmanager
    def edit(
        self, edits: Mapping[Any, Any], positions: Any = None, mode: Any = None, alpha: float = 1.0
    ) -> Iterator[None]:
        """Edit sites in every forward inside the ``with`` block (generation included).

        Without ``mode``, ``edits`` maps sites to functions of their value (``{"blocks.5.
        attn.hook_z": lambda z: z * 0}``); with a ``mode`` (``add``, ``reflect``... or a
        ``_target_`` config), to vectors, or ``(vector, center)`` pairs, applied with
        ``alpha``. ``positions``: None (all), ``last``, ints or per-row lists."""
        if mode is None:
            with edit_sites(self.model, edits, positions):
                yield
            return
        steering = []
        for site, value in edits.items():
            vector, center = value if isinstance(value, tuple) else (value, None)
            steering.append(SiteEdit(site, vector, center, positions))
        with steer_sites(self.model, steering, mode, alpha):
            yield

    def generate(self, prompt: str, max_tokens: int = 48, chat: bool | None = None) -> str:
        """Greedy continuation of ``prompt`` as text: in the chat template when ``chat``; by
        default (None) in the model's prompt format (plain text for a base model)."""
        from mlx_lm import generate

        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ConfigError(f"max_tokens must be a positive int, not {max_tokens!r}")
        tokens = self.tokens(prompt, chat)
        with row_lengths([len(tokens)]):  # edits at positions: -1 is the prompt's last token
            return generate(self.model, self.tokenizer, tokens, max_tokens=max_tokens)


def load(
    model: str | Path, dequantize: str | bool = "auto", anatomy: Mapping[str, Any] | None = None
) -> Model:
    """Load a model: a config name under conf/model (``smollm2_135m``, ``tiny_random``...),
    a ``.gguf`` file, a folder saved by mlx-lm, or a Hugging Face id (mlx-lm, needs the hub).

    ``dequantize``: ``auto`` gives float32 weights on the CPU and keeps quantized weights on
    Metal/CUDA; True or False forces it. ``anatomy``: role -> attribute path for a layout
    the library does not know (the config key ``model.anatomy``), e.g. ``{"mlp": "ffn"}``.
    """
    cfg = model_config(model)
    cfg["dequantize"] = dequantize
    if anatomy is not None:
        cfg["anatomy"] = dict(anatomy)
    return Model(load_model(cfg))  # a missing file or bad model is a named ModelLoadError


class RecordedSiteError(MlxInterpError, KeyError):
    """A cache key names a site that was not recorded (a KeyError, so ``in`` works)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class ActivationCache(Mapping):
    """Recorded values by site; index like TransformerLens's cache.

    ``cache["resid_post", 8]``, ``cache["layers.8.mlp"]``, ``cache["blocks.-1.hook_resid_post"]``,
    ``cache["pattern", 3]``, ``cache["embed"]``. From :meth:`Model.record`: numpy ``[n_prompts,
    width]`` (heads: ``[n_prompts, n_heads, head_dim]``) for ``last`` and ``mean`` positions,
    or a list of ``[n_tokens_i, ...]`` arrays for ``all``. From :meth:`Model.run_with_cache`:
    the batch's values (``mx.array`` unless ``as_numpy``), pad tokens NaN, each row's real
    length in ``lengths``.
    """

    def __init__(
        self,
        values: dict[Site, Any],
        prompts: list,
        positions: Any,
        n_layers: int,
        lengths: list[int] | None = None,
    ):
        self._values = {site.name: value for site, value in values.items()}
        self._sites = {site.name: site for site in values}
        self.prompts, self.positions, self.n_layers = prompts, positions, n_layers
        self.lengths = lengths

    def _key(self, key: Any) -> str:
        site = parse_site(key)
        if not -self.n_layers <= site.layer < self.n_layers:
            raise SiteError(f"layer {site.layer} is out of range for {self.n_layers} layers")
        name = Site(site.layer % self.n_layers, site.kind).name
        if name not in self._values:
            raise RecordedSiteError(
                f"{key!r} ({name}) was not recorded; recorded: {sorted(self._values)}"
            )
        return name

    def __getitem__(self, key: Any) -> Any:
        return self._values[self._key(key)]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"ActivationCache({len(self.prompts)} prompts, {self.positions}, {list(self)})"

    def stack(self, kind: str, layers: Sequence[int] | None = None) -> Any:
        """The values of one kind (``resid_post``, ``pattern``...) over layers, stacked on a
        new first axis ``[n_layers, ...]`` in layer order (``layers``: those, else every
        recorded one); mx or numpy like the values."""
        wanted = kind_of(kind)
        if wanted is None:
            raise SiteError(f"{kind!r} is not a site kind; e.g. resid_post, pattern, z, mlp_post")
        found = sorted(s for s in self._sites.values() if s.kind == wanted)
        if layers is not None:
            keep = {
                layer % self.n_layers for layer in ([layers] if isinstance(layers, int) else layers)
            }
            found = [s for s in found if s.layer in keep]
        if not found:
            raise RecordedSiteError(f"no {wanted} values were recorded; recorded: {sorted(self)}")
        values = [self._values[s.name] for s in found]
        if isinstance(values[0], list):
            raise ConfigError("positions='all' from record gives one array per prompt: no stack")
        return mx.stack(values) if isinstance(values[0], mx.array) else np.stack(values)


class Direction(DirectionSet):
    """A direction per layer with the class means it came from; steer with :meth:`apply`.

    It is the pipeline's ``DirectionSet`` (arithmetic, ``save``/``load`` as safetensors with
    provenance), plus training from prompts and llama.cpp control-vector files.
    """

    @classmethod
    def train(
        cls,
        model: Model,
        positive: Sequence[str],
        negative: Sequence[str],
        layers: Sequence[int] | int | None = None,
        method: Any = "mean_diff",
        chat: bool = False,
        positions: str = "last",
    ) -> Direction:
        """Fit ``positive - negative`` at each layer (residual stream, last token by default).

        ``method``: ``mean_diff``, ``pca`` (paired differences: equal list lengths) or
        ``logistic``, or a ``_target_`` config.
        """
        positive, negative = list(positive), list(negative)
        pairs = None
        if method == "pca" or (isinstance(method, Mapping) and "PCA" in str(method)):
            if len(positive) != len(negative):
                raise ConfigError("pca pairs prompts: give positive and negative of equal length")
            pairs = np.stack([np.arange(len(positive))] * 2, axis=1)
        cache = model.record(positive + negative, "resid_post", layers, positions, chat)
        acts = {parse_site(name).layer: np.asarray(cache[name]) for name in cache}
        is_pos = np.arange(len(positive) + len(negative)) < len(positive)
        fitted = extract(acts, is_pos, ~is_pos, method, ("positive", "negative"), pairs)
        meta = {**fitted.meta, "model": model.name, "positions": positions, "chat": chat}
        return cls(
            fitted.vectors, fitted.pos_means, fitted.neg_means, fitted.method, fitted.contrast, meta
        )

    @contextmanager
    def apply(
        self,
        model: Model | Any,
        alpha: float = 1.0,
        mode: Any = "add",
        layers: Sequence[int] | None = None,
    ) -> Iterator[None]:
        """Steer every forward inside the ``with`` block; the model is restored after.

        ``mode``: ``add`` (h + alpha * v), ``subtract``, ``reflect`` (mirror through the class
        midpoint; alpha 1 is an exact mirror), ``ablate``, or any steering-mode config.
        ``layers``: a subset of this direction's layers (default: all of them).
        """
        target = model.model if isinstance(model, Model) else model
        chosen = self.layers if layers is None else list(layers)
        missing = sorted(set(chosen) - set(self.layers))
        if missing:
            raise ConfigError(f"no direction at layer(s) {missing}; this one has {self.layers}")
        edits = [LayerEdit(layer, self.vectors[layer], self.center(layer)) for layer in chosen]
        with steer(target, edits, mode, alpha):
            yield

    def save_control_vector(self, path: str | Path, alpha: float = 1.0) -> list[int]:
        """Write a llama.cpp control vector (GGUF, ``direction.L`` = alpha * vector)."""
        return export_control_vector(self, path, alpha)

    @classmethod
    def load_control_vector(cls, path: str | Path) -> Direction:
        """Read a llama.cpp / repeng control vector GGUF (ours round-trips exactly)."""
        d = import_control_vector(path)
        return cls(d.vectors, d.pos_means, d.neg_means, d.method, d.contrast, d.meta)
