"""``mlx-interp-chat``: a terminal chat with streaming tokens and steering switched by commands.

Every turn re-reads the whole conversation (the model's chat template, via the prompts stage's
``render``) and generates with mlx-lm's ``stream_generate`` inside
:func:`mlx_interp.interventions.steering.steer`,
so the current steering edits the prompt and every KV-cached decode step. Slash commands
change the steering between turns; a bad command prints one ``error:`` line and the chat
goes on. ``/preset colorblind`` turns on the default experiment's green/red reflection.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import mlx_interp  # noqa: F401  (loads the optimized BLAS before mlx)
from mlx_interp.analysis.directions import DirectionSet
from mlx_interp.apps.chat_preset import CONF_DIR, colorblind_preset, compose
from mlx_interp.errors import MlxInterpError, one_line, report_error

PROMPT = "you> "
HELP = """commands:
  /steer [FILE] [layer=8[,10]] [alpha=2] [mode=reflect]   steer with a direction set
        FILE: directions .safetensors, artifact or run folder, or a control-vector .gguf;
        leave it out to change layer/alpha/mode of the loaded set
  /preset colorblind   the default experiment's green/red reflection (layer, alpha from config)
  /off, /on            switch the loaded steering off / back on
  /status              model, steering, history length, temperature
  /fewshot on|off      the concept's example turns before the chat (the preset turns them on)
  /temp T              sampling temperature (0 = greedy, the default)
  /reset               forget the conversation
  /help, /quit         this text; leave (Ctrl-D works too)"""


class ChatError(MlxInterpError, ValueError):
    """A command that cannot be carried out; the chat prints it and goes on."""


@dataclass
class Steering:
    """A direction set and how to apply it: layers, alpha, mode name."""

    source: str
    dirset: DirectionSet
    layers: list[int]
    alpha: float
    mode: Any  # a MODES name, or a ``_target_`` config (from the experiment's steer.mode)
    positions: str = "all"  # all tokens | last: the last prompt token and every generated one

    def edits(self) -> list:
        from mlx_interp.interventions.steering import LayerEdit

        return [
            LayerEdit(layer, self.dirset.vectors[layer], self.dirset.center(layer))
            for layer in self.layers
        ]

    def short(self) -> str:
        layers = ",".join(map(str, self.layers))
        mode = self.mode if isinstance(self.mode, str) else self.mode["_target_"].split(".")[-1]
        where = "" if self.positions == "all" else f" @{self.positions}"
        return f"{mode} L{layers} a{self.alpha:g}{where}"


def parse_steer_args(tokens: Sequence[str]) -> tuple[str | None, dict[str, str]]:
    """``[FILE] key=value ...`` -> (file or None, {key: value}); keys: layer, alpha, mode."""
    path, options = None, {}
    for token in tokens:
        if "=" in token:
            key, value = token.split("=", 1)
            if key not in ("layer", "layers", "alpha", "mode", "positions"):
                raise ChatError(f"unknown option {key!r}: use layer=, alpha=, mode=, positions=")
            options["layer" if key == "layers" else key] = value
        elif path is None:
            path = token
        else:
            raise ChatError(f"one direction file at a time; got {path!r} and {token!r}")
    return path, options


class ChatSession:
    """The conversation, the model and the steering state; ``handle`` takes one input line."""

    def __init__(self, cfg: dict, loaded: Any, temp: float, max_tokens: int, out: TextIO):
        problem = flag_problem(float(temp), int(max_tokens))
        if problem:
            raise ChatError(problem)
        self.cfg, self.loaded, self.out = cfg, loaded, out
        self.temp, self.max_tokens = float(temp), int(max_tokens)
        self.system = cfg.get("concept", {}).get("system_prompt")
        self.history: list[tuple[str, str]] = []
        self.shots: list[tuple[str, str]] = []  # hidden example turns before the history
        self.steering: Steering | None = None
        self.enabled = False
        self.commands: dict[str, Callable[[list[str]], None]] = {
            "help": lambda a: self.say(HELP),
            "steer": self.cmd_steer,
            "preset": self.cmd_preset,
            "off": lambda a: self.set_enabled(False),
            "on": lambda a: self.set_enabled(True),
            "status": lambda a: self.say(self.status()),
            "temp": self.cmd_temp,
            "reset": self.cmd_reset,
            "fewshot": self.cmd_fewshot,
        }

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def handle(self, line: str) -> bool:
        """Run a command or answer a message; False means quit."""
        line = line.strip()
        if not line:
            return True
        if not line.startswith("/"):
            self.answer(line)
            return True
        name, *args = line[1:].split()
        if name in ("quit", "exit", "q"):
            return False
        if name not in self.commands:
            self.say(f"error: unknown command /{name}; /help lists the commands")
            return True
        try:
            self.commands[name](args)
        except (MlxInterpError, OSError) as err:
            self.say(f"error: {err}")
        return True

    def status(self) -> str:
        if self.steering is None:
            steering = "off (nothing loaded)"
        else:
            state = "on" if self.enabled else "off"
            steering = f"{state}: {self.steering.short()} from {self.steering.source}"
        return (
            f"model: {self.loaded.name} ({self.loaded.n_layers} layers, d_model "
            f"{self.loaded.d_model})\nsteering: {steering}\nhistory: {len(self.history)} "
            f"turn(s) after {len(self.shots)} few-shot turn(s); temp {self.temp:g}; "
            f"max tokens {self.max_tokens}"
        )

    def set_enabled(self, on: bool) -> None:
        steering = self.steering
        if on and steering is None:
            raise ChatError("no steering loaded: /steer FILE layer=N or /preset colorblind")
        self.enabled = on
        self.say(f"steering on: {steering.short()}" if on and steering else "steering off")

    def cmd_temp(self, args: list[str]) -> None:
        try:
            temp = float(args[0])
        except (IndexError, ValueError) as err:
            raise ChatError("usage: /temp T with T >= 0 (0 = greedy)") from err
        if not (math.isfinite(temp) and temp >= 0):
            raise ChatError(f"temperature must be a finite number >= 0, got {args[0]}")
        self.temp = temp
        self.say(f"temperature {temp:g}")

    def cmd_fewshot(self, args: list[str]) -> None:
        """``/fewshot on|off``: the concept's example turns before the conversation."""
        if args not in (["on"], ["off"]):
            raise ChatError("usage: /fewshot on|off")
        concept = self.cfg.get("concept", {})
        if args == ["on"]:
            examples = concept.get("fewshot") or []
            if not examples:
                raise ChatError(f"concept {concept.get('name')!r} has no few-shot examples")
            instruction = concept.get("instruction") or "{text}"
            self.shots = [(instruction.format(text=ex["text"]), ex["answer"]) for ex in examples]
        else:
            self.shots = []
        self.say(f"few-shot turns: {len(self.shots)}")

    def cmd_reset(self, args: list[str]) -> None:
        self.history.clear()
        self.say("history cleared")

    def cmd_steer(self, args: list[str]) -> None:
        from mlx_interp.io.control_vectors import load_directions

        path, options = parse_steer_args(args)
        previous = self.steering if path is None else None
        if path is not None:
            dirset, source = load_directions(path), path
        elif previous is not None:  # new layer/alpha/mode for the loaded set
            dirset, source = previous.dirset, previous.source
        else:
            raise ChatError("usage: /steer FILE [layer=N] [alpha=A] [mode=M]; /help for more")
        self.activate(self._steering(dirset, source, options, previous))

    def _steering(
        self, dirset: DirectionSet, source: str, options: dict, previous: Steering | None
    ) -> Steering:
        """A validated Steering from a set and ``layer=``/``alpha=``/``mode=`` options."""
        if "layer" in options:
            try:
                layers = [int(x) for x in options["layer"].split(",") if x]
            except ValueError as err:
                raise ChatError(
                    f"layer must be an int or a list like 8,10: {options['layer']!r}"
                ) from err
        elif previous is not None:
            layers = previous.layers
        elif len(dirset.layers) == 1:
            layers = dirset.layers
        else:
            raise ChatError(f"say which layer: layer=N (this set has layers {dirset.layers})")
        missing = [k for k in layers if k not in dirset.vectors]
        if missing or not layers:
            raise ChatError(f"no direction for layer(s) {missing}; this set has {dirset.layers}")
        try:
            alpha = float(options["alpha"]) if "alpha" in options else None
        except ValueError as err:
            raise ChatError(f"alpha must be a number, got {options['alpha']!r}") from err
        if alpha is None:
            alpha = previous.alpha if previous else 1.0
        mode = options.get("mode") or (previous.mode if previous else None)
        if mode is None:
            mode = "add" if dirset.meta.get("centers_known") is False else "reflect"
        positions = options.get("positions") or (previous.positions if previous else "all")
        if positions not in ("all", "last"):
            raise ChatError(f"positions must be all or last in the chat, not {positions!r}")
        return Steering(source, dirset, layers, alpha, mode, positions)

    def activate(self, steering: Steering) -> None:
        """Check the steering against the model (no forward), then switch it on."""
        from mlx_interp.interventions.steering import steer

        with steer(self.loaded.model, steering.edits(), steering.mode, steering.alpha):
            pass  # steer() validates mode, alpha, widths and layers before touching the model
        self.steering, self.enabled = steering, True
        self.say(
            f"steering on: {steering.short()} ({steering.dirset.contrast[0]} - "
            f"{steering.dirset.contrast[1]}, {steering.dirset.method}) from {steering.source}"
        )

    def cmd_preset(self, args: list[str]) -> None:
        if args != ["colorblind"]:
            raise ChatError("usage: /preset colorblind (the only preset)")
        started = time.time()
        self.say("preset colorblind: finding the green/red direction ...")
        preset = colorblind_preset(self.cfg, self.say)
        if not self.shots:  # the experiment's prompts: few-shot turns so it answers in a word
            self.cmd_fewshot(["on"])
        steering = self._steering(
            preset.dirset,
            preset.source,
            {
                "layer": str(preset.layer),
                "alpha": str(preset.alpha),
                "mode": preset.mode,
                "positions": preset.positions,
            },
            None,
        )
        self.activate(steering)
        self.say(f"(preset ready in {time.time() - started:.1f}s)")

    def answer(self, text: str) -> str:
        """Stream the model's reply to ``text`` under the current steering; keep it in history."""
        from mlx_lm.generate import stream_generate
        from mlx_lm.sample_utils import make_sampler

        from mlx_interp.interventions.steering import steer

        tokens = chat_tokens(self.loaded.tokenizer, self.system, self.shots + self.history, text)
        steering = self.steering if self.enabled else None
        label = f"model [{steering.short()}]> " if steering else "model> "
        print(label, end="", file=self.out, flush=True)
        edits = steering.edits() if steering else []
        mode = steering.mode if steering else "add"
        alpha = steering.alpha if steering else 0.0
        if steering and steering.positions == "last":  # as the steer stage places it
            from mlx_interp.interventions.positions import FromPosition
            from mlx_interp.interventions.steering import make_mode

            mode = FromPosition(make_mode(mode), start=len(tokens) - 1)
        parts: list[str] = []
        try:
            with steer(self.loaded.model, edits, mode, alpha):
                for response in stream_generate(
                    self.loaded.model,
                    self.loaded.tokenizer,
                    tokens,
                    max_tokens=self.max_tokens,
                    sampler=make_sampler(temp=self.temp),
                ):
                    parts.append(response.text)
                    print(response.text, end="", file=self.out, flush=True)
        except KeyboardInterrupt:
            parts.append(" [interrupted]")
        reply = "".join(parts).strip()
        print(file=self.out, flush=True)
        self.history.append((text, reply))
        return reply


def chat_tokens(
    tokenizer: Any, system: str | None, turns: Sequence[tuple[str, str]], text: str
) -> list[int]:
    """Token ids of the conversation in the model's chat template, ready for the reply."""
    messages = [{"role": "system", "content": system}] if system else []
    for question, reply in turns:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
    messages.append({"role": "user", "content": text})
    chat = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer.encode(chat, add_special_tokens=False))


def model_overrides(model: str | None) -> list[str]:
    """Hydra overrides for ``--model``: a conf/model name, a .gguf file or an mlx-lm model."""
    if model is None:
        return []
    conf = Path(CONF_DIR) / "model" / f"{model}.yaml"
    if conf.is_file():
        return [f"model={model}"]
    if model.endswith(".gguf"):
        return ["model=gguf", f"model.path={model}", f"model.name={Path(model).stem}"]
    if "/" not in model and not Path(model).expanduser().exists():
        from mlx_interp.models.loading import ModelLoadError, source_for_path

        names = sorted(p.stem for p in (Path(CONF_DIR) / "model").glob("*.yaml"))
        try:  # a bare word that is no conf/model name: the library's plain message
            source_for_path(model)
        except ModelLoadError as err:
            raise ModelLoadError(f"{err} (conf/model names: {', '.join(names)})") from err
    name = Path(model.rstrip("/")).name or model
    return ["model=qwen2_5_7b_instruct_4bit", f"model.path={model}", f"model.name={name}"]


def flag_problem(temp: float, max_tokens: int) -> str | None:
    """Why ``--temp``/``--max-tokens`` cannot be used (checked before the model loads)."""
    if not math.isfinite(temp) or temp < 0:
        return f"--temp must be a finite number >= 0 (0 = greedy), not {temp}; e.g. --temp 0.7"
    if max_tokens < 1:
        return f"--max-tokens must be >= 1, not {max_tokens}; e.g. --max-tokens 128"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mlx-interp-chat", description="Chat with a model; steer it with /steer, /preset."
    )
    parser.add_argument(
        "--model", help="conf/model name (default smollm2_135m), a .gguf, or an mlx-lm folder/id"
    )
    parser.add_argument("--preset", choices=["colorblind"], help="start with this steering")
    parser.add_argument("--steer", help="start with '/steer' arguments, e.g. 'FILE layer=8'")
    parser.add_argument("--fewshot", action="store_true", help="start with /fewshot on")
    parser.add_argument("--temp", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument(
        "--override", action="append", default=[], help="extra Hydra override (repeatable)"
    )
    args = parser.parse_args(argv)
    problem = flag_problem(args.temp, args.max_tokens)
    if problem:
        return report_error(ChatError(problem))
    from mlx_interp.blas import log_blas

    try:
        log_blas()  # MLX_INTERP_BLAS naming a library that does not load
    except MlxInterpError as err:
        return report_error(err)
    from mlx_interp.models.loading import load_model

    try:
        cfg = compose(model_overrides(args.model) + list(args.override))
        started = time.time()
        loaded = load_model(cfg["model"])
    except MlxInterpError as err:  # a bad value or model: one line, exit 2, like mlx-interp
        return report_error(err)
    except Exception as err:  # Hydra could not compose (e.g. an unknown --model name)
        names = sorted(p.stem for p in (Path(CONF_DIR) / "model").glob("*.yaml"))
        print(
            f"error: {one_line(err)} (--model takes a conf/model name: {', '.join(names)}; a "
            ".gguf file; or an mlx-lm folder or Hugging Face id)",
            file=sys.stderr,
        )
        return 2
    session = ChatSession(cfg, loaded, args.temp, args.max_tokens, sys.stdout)
    session.say(f"{loaded.name} loaded in {time.time() - started:.1f}s. /help for commands.")
    if args.fewshot:
        session.handle("/fewshot on")
    if args.preset:
        session.handle(f"/preset {args.preset}")
    if args.steer:
        session.handle(f"/steer {args.steer}")
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    while True:
        try:
            line = input(PROMPT)
        except EOFError:
            print(file=sys.stdout)
            break
        except KeyboardInterrupt:
            print("^C (/quit or Ctrl-D to leave)", file=sys.stdout)
            continue
        if not session.handle(line):
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
