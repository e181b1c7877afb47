"""The text a model reads for a prompt: chat template or plain Q:/A: lines, with few-shot."""

from __future__ import annotations

from mlx_interp.io.datasets import DatasetError


def render(
    tokenizer,
    user_text: str,
    fmt: str,
    system_prompt: str | None,
    shots: list[tuple[str, str]],
    response: str | None = None,
) -> tuple[str, list]:
    """The text the model reads and its token ids; ``shots`` are (question, answer) examples.

    With ``response`` the assistant's reply follows the user turn and the text stops at the
    reply's end (the end-of-turn marker is left out, so the last token belongs to the reply).
    """
    if fmt == "plain":
        text = "".join(f"Q: {q}\nA: {a}\n\n" for q, a in shots)
        if response is not None:
            text += f"Q: {user_text}\nA: {response}"
        else:
            text += f"Q: {user_text}\nA:" if shots else user_text
        return text, list(tokenizer.encode(text))
    messages = []
    if system_prompt is not None:
        messages.append({"role": "system", "content": system_prompt})
    for q, a in shots:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": user_text})
    if response is None:
        chat_text = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
    else:
        messages.append({"role": "assistant", "content": response})
        full = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
        end = full.rfind(response)
        if end < 0:
            raise DatasetError(
                "the chat template changed the assistant reply's text, so its end cannot be "
                f"found: {response[:60]!r}; use prompts.format=plain or simplify the reply"
            )
        chat_text = full[: end + len(response)]
    return chat_text, list(tokenizer.encode(chat_text, add_special_tokens=False))
