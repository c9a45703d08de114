"""`moelab chat`: streamed generation with the model's chat template, and a rich view of where the router sent tokens."""

from __future__ import annotations

import inspect
import json
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from moelab.errors import MoelabError
from moelab.probe import MoeModel, ProbeResult, RoutingTrace, build_trace, expert_color, save_heatmap

SUPERSCRIPT = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")
HELP = "commands: /reset (forget the conversation), /quit (or Ctrl-D)"


@dataclass
class GenerationSettings:
    max_new_tokens: int = 256
    temperature: float = 0.7  # 0 means greedy
    top_p: float = 0.9
    seed: int = 0


def generate_traced(moe: MoeModel, input_ids: Sequence[int], settings: GenerationSettings,
                    on_text: Optional[Callable[[str], None]] = None,
                    trace: bool = True) -> tuple[str, Optional[RoutingTrace]]:
    """Generate an answer to `input_ids` (streamed to `on_text`); with `trace`, the routing of prompt and answer.

    The router hooks only read; the seed is set before every answer, so the same conversation gives the same text.
    """
    import torch
    from transformers import GenerationConfig, TextStreamer

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            on_text(text)

    sampling = settings.temperature > 0
    config = GenerationConfig(
        max_new_tokens=settings.max_new_tokens, do_sample=sampling,
        temperature=settings.temperature if sampling else None, top_p=settings.top_p if sampling else None,
        eos_token_id=moe.model.generation_config.eos_token_id or moe.tokenizer.eos_token_id,
        pad_token_id=moe.tokenizer.pad_token_id or moe.tokenizer.eos_token_id, return_dict_in_generate=True)
    streamer = Streamer(moe.tokenizer, skip_prompt=True, skip_special_tokens=True) if on_text else None
    torch.manual_seed(settings.seed)
    with torch.no_grad(), moe.recorder.recording() if trace else nullcontext():
        out = moe.model.generate(torch.tensor([list(input_ids)], device=moe.device), generation_config=config,
                                 streamer=streamer)
        answer_ids = out.sequences[0, len(input_ids):].tolist()
        if trace and answer_ids:
            # generate never feeds its last token back; one more step through the cache routes it too. The cache
            # is `cache` from transformers 5.25 on (`past_key_values` goes in 5.40), `past_key_values` before.
            cache = "cache" if "cache" in inspect.signature(moe.model.forward).parameters else "past_key_values"
            moe.model(out.sequences[:, -1:], **{cache: getattr(out, cache)}, logits_to_keep=1)
    answer = moe.tokenizer.decode(answer_ids, skip_special_tokens=True)
    if not trace:
        return answer, None
    return answer, build_trace(moe.tokenizer, list(input_ids) + answer_ids, moe.expert_names, moe.layers,
                               moe.recorder.take(), len(input_ids))


@dataclass
class ChatSession:
    moe: MoeModel
    settings: GenerationSettings
    history: list[dict] = field(default_factory=list)

    def ask(self, text: str, on_text: Optional[Callable[[str], None]] = None) -> tuple[str, RoutingTrace]:
        """Answer `text` after the history; the trace covers the tokens new in this turn (earlier turns are
        re-read by the model but were shown before)."""
        messages = self.history + [{"role": "user", "content": text}]
        input_ids = self._template_ids(messages, add_generation_prompt=True)
        seen = self._template_ids(self.history, add_generation_prompt=False) if self.history else []
        new_from = len(seen) if input_ids[:len(seen)] == seen else 0
        answer, trace = generate_traced(self.moe, input_ids, self.settings, on_text)
        self.history = messages + [{"role": "assistant", "content": answer}]
        return answer, trace.tail(new_from)

    def reset(self) -> None:
        self.history = []

    def _template_ids(self, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        tokenizer = self.moe.tokenizer
        if not tokenizer.chat_template:
            raise MoelabError(f"the tokenizer in {self.moe.folder} has no chat template; add one to its "
                              "tokenizer_config.json (chat needs it), or use --probe to route plain text")
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        return tokenizer(text, add_special_tokens=False)["input_ids"]


def run_chat(session: ChatSession, prompts: Sequence[str], out: Console, trace_path: Optional[Path] = None,
             heatmap_path: Optional[Path] = None, model_ref: str = "") -> None:
    """Answer `prompts` in turn, or (none given) read user turns until /quit or end of input.

    After each answer: the routing view; `trace_path` gets every turn's trace so far, `heatmap_path` the latest."""
    from moelab.eval.report import write_text_atomic

    turns: list[dict] = []

    def answer(text: str) -> None:
        out.print("[bold]assistant>[/bold] ", end="")
        _, trace = session.ask(text, lambda piece: out.print(piece, end="", markup=False, highlight=False))
        out.print()
        out.print(routing_view(trace))
        turns.append(trace.to_json())
        if trace_path:
            write_text_atomic(Path(trace_path), json.dumps({"model": model_ref, "turns": turns}, indent=1))
        if heatmap_path:
            save_heatmap(trace, Path(heatmap_path))

    if prompts:
        for text in prompts:
            out.print(f"[bold]you>[/bold] {text}", highlight=False)
            answer(text)
        return
    out.print(f"[dim]{HELP}[/dim]")
    while True:
        try:
            text = out.input("[bold]you>[/bold] ").strip()
        except EOFError:
            out.print()
            return
        if text == "/quit":
            return
        if text == "/reset":
            session.reset()
            out.print("[dim]conversation cleared[/dim]")
        elif text.startswith("/"):
            out.print(f"[dim]unknown command {text}; {HELP}[/dim]", highlight=False)
        elif text:
            answer(text)


def expert_legend(names: Sequence[str]) -> Text:
    legend = Text("experts: ", style="dim")
    for e, name in enumerate(names):
        legend.append(f"■ {name}  ", style=expert_color(e))
    return legend


def routing_view(trace: RoutingTrace) -> Group:
    """Each token in the colour of the expert most layers chose first, with the share of layers as a superscript;
    then each expert's share of the token-layer choices, overall and per band of layers."""
    top, share = trace.top_expert_per_token()
    tokens = Text()
    for i, (token, expert, layer_share) in enumerate(zip(trace.tokens, top, share)):
        if i == trace.num_prompt_tokens and i > 0:
            tokens.append("\n── answer ──\n", style="dim")
        tokens.append(token.replace("\n", "↵\n"), style=f"bold {expert_color(int(expert))}")
        tokens.append(f"{round(layer_share * 100)}".translate(SUPERSCRIPT), style="dim")
    table = Table(title="expert usage (share of token-layer choices)", title_justify="left")
    table.add_column("expert")
    bands = trace.layer_bands()
    for label in ["all layers"] + [label for label, _ in bands]:
        table.add_column(label, justify="right")
    per_band = [trace.usage()] + [trace.usage(positions) for _, positions in bands]
    for e, name in enumerate(trace.expert_names):
        table.add_row(Text(name, style=f"bold {expert_color(e)}"), *[f"{u[e]:.0%}" for u in per_band])
    return Group(expert_legend(trace.expert_names), tokens, table)


def probe_view(result: ProbeResult) -> Group:
    """The routing confusion matrix (expected x chosen, shares of token-layer top-1 choices) and the summary."""
    names = result.expert_names
    table = Table(title="routing confusion: expected (rows) x top-1 chosen (share of token-layer choices)",
                  title_justify="left")
    table.add_column("expected")
    for e, name in enumerate(names):
        table.add_column(Text(name, style=f"bold {expert_color(e)}"), justify="right")
    table.add_column("accuracy", justify="right")
    table.add_column("token-layers", justify="right")
    shares, accuracy, rows = result.shares(), result.accuracy_per_expert(), result.confusion.sum(axis=1)
    for e, name in enumerate(names):
        cells = [Text(f"{shares[e, c]:.0%}", style="bold" if c == e else "") for c in range(len(names))]
        table.add_row(Text(name, style=f"bold {expert_color(e)}"), *cells,
                      "-" if accuracy[name] is None else f"{accuracy[name]:.1%}", str(rows[e]))
    usage = ", ".join(f"{n} {u:.0%}" for n, u in zip(names, result.usage))
    summary = Text.assemble(
        ("routing accuracy ", "bold"), f"{result.accuracy():.1%} of token-layer choices, "
        f"{result.prompt_accuracy():.1%} of prompts by majority ({result.num_prompts} prompts, "
        f"{result.num_tokens} tokens)\n",
        ("load balance ", "bold"), f"coefficient of variation {result.load_balance_cv():.3f} "
        f"(0 = even; usage of top-k choices: {usage})")
    return Group(table, summary)
