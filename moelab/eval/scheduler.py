"""The fast eval engine: one scheduled pass over the log-likelihood requests of all tasks, each context run once.

lm-eval still builds every request (its prompts, targets, delimiters) and computes every metric; only the scoring
in between is ours. Requests are encoded as lm-eval's hf backend encodes them (trailing spaces of the context move
to the continuation; the continuation is what the whole text adds after the context's own tokens), so that the
model sees the same tokens. All requests whose context encodes to the same tokens become one *row*: the context
once, then every continuation but its last token, each continuation attending to the context and to itself only
(a 4D mask and position ids restarting after the context). Rows are sorted by length and cut into batches that
hold at most `batch_tokens` tokens (padding included), collated on a background thread while the model computes;
log-probabilities are taken in float32 at the answer positions only.
"""

from __future__ import annotations

import functools
import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

# Model families whose logits are exactly lm_head(last hidden state): for them we apply the head at the answer
# positions only. Others (logit soft-capping, logit scales) run the whole forward and gather from its logits.
HEAD_ONLY_MODEL_TYPES = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe"})
# Tokens per forward pass (padding included) when settings do not say: what a 7B model holds easily on a 24 GB GPU.
DEFAULT_BATCH_TOKENS = {"cuda": 32768, "cpu": 4096}
TOKENIZE_CHUNK = 1024  # strings per fast-tokenizer call


@dataclass(frozen=True)
class ScheduleOptions:
    batch_tokens: int  # most tokens one forward pass holds, padding included
    prefetch_batches: int = 2  # batches collated ahead on the CPU
    # Data-parallel: the devices of all replicas (the loaded model's first), and what a worker process loads for
    # the others: (model folder or Hub id, dtype). One device: no worker processes.
    replica_devices: tuple[str, ...] = ()
    replica: tuple[str, str] | None = None


@dataclass
class ScheduleStats:
    """What one scheduled pass did, for the report's speed section."""

    requests: int = 0  # log-likelihood requests asked for
    cached: int = 0  # of which answered from the resume cache
    rows: int = 0  # distinct contexts run (a row holds one context and all its continuations)
    batches: int = 0
    tokens: int = 0  # real tokens run through the model
    padded_tokens: int = 0  # tokens including padding
    tokenize_s: float = 0.0
    score_s: float = 0.0


@dataclass
class Answer:
    """Where one request's continuation is scored inside its row."""

    request: int  # index into the pass's request list
    positions: list[int]  # row positions whose next-token distribution scores each continuation token
    targets: list[int]  # the continuation tokens


@dataclass
class Row:
    tokens: list[int]
    positions: list[int]  # position ids: continuation segments restart right after the context
    segments: list[int]  # 0 for the context, i for continuation i: a token sees the context and its own segment
    answers: list[Answer] = field(default_factory=list)


def default_batch_tokens(device: str) -> int:
    return DEFAULT_BATCH_TOKENS["cuda" if device.startswith("cuda") else "cpu"]


def encode_requests(lm, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(context tokens, continuation tokens) of each (context, continuation) exactly as lm-eval's HFLM encodes them
    (`LM.loglikelihood` and `_encode_pair`), but each distinct string once, in batched fast-tokenizer calls."""
    bos_text = lm.tokenizer.decode(lm.prefix_token_id)
    texts: dict[tuple[str, bool | None], None] = {}

    def special_tokens(text: str) -> bool | None:
        # tok_encode's rule: the model's add_bos_token setting, but never a second BOS before a leading one
        return False if text.startswith(bos_text) else lm.add_bos_token

    plans = []
    for context, continuation in pairs:
        if context == "":
            plans.append(("empty", (continuation, False)))
            texts[continuation, False] = None
            continue
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole, alone = (context + continuation, special_tokens(context + continuation)), (context, special_tokens(context))
        texts[whole] = texts[alone] = None
        plans.append(("pair", (whole, alone)))

    encoded: dict[tuple[str, bool | None], list[int]] = {}
    for flag in {flag for _, flag in texts}:
        strings = [text for text, f in texts if f == flag]
        kwargs = {} if flag is None else {"add_special_tokens": flag}
        for start in range(0, len(strings), TOKENIZE_CHUNK):
            chunk = strings[start:start + TOKENIZE_CHUNK]
            for text, ids in zip(chunk, lm.tokenizer(chunk, **kwargs)["input_ids"]):
                encoded[text, flag] = list(ids)

    out = []
    for kind, keys in plans:
        if kind == "empty":
            continuation_ids = encoded[keys]
            out.append(([lm.prefix_token_id], continuation_ids) if lm.prefix_token_id != continuation_ids[0]
                       else (continuation_ids[:1], continuation_ids[1:]))
        else:
            whole_ids, context_ids = encoded[keys[0]], encoded[keys[1]]
            out.append((context_ids, whole_ids[len(context_ids):]))
    return out


def plan_rows(encoded: list[tuple[list[int], list[int]]], max_length: int) -> list[Row]:
    """Rows of one context and all its continuations, longest first. A request lm-eval would left-truncate (context
    plus continuation over max_length + 1 tokens) gets a row of its own holding exactly lm-eval's truncated input."""
    by_context: dict[tuple[int, ...], list[int]] = {}
    rows = []
    for index, (context, continuation) in enumerate(encoded):
        if len(context) + len(continuation) > max_length + 1:
            tokens = (context + continuation)[-(max_length + 1):][:-1]
            start = len(tokens) - len(continuation)
            rows.append(Row(tokens, list(range(len(tokens))), [0] * len(tokens),
                            [Answer(index, list(range(start, len(tokens))), continuation)]))
        else:
            by_context.setdefault(tuple(context), []).append(index)
    for context, members in by_context.items():
        row = Row(list(context), list(range(len(context))), [0] * len(context))
        for segment, index in enumerate(members, start=1):
            continuation = encoded[index][1]
            start = len(row.tokens)
            row.tokens += continuation[:-1]
            row.positions += range(len(context), len(context) + len(continuation) - 1)
            row.segments += [segment] * (len(continuation) - 1)
            row.answers.append(Answer(index, [len(context) - 1, *range(start, start + len(continuation) - 1)],
                                      continuation))
        rows.append(row)
    rows.sort(key=lambda row: (-len(row.tokens), row.tokens))
    return rows


def batches_of(rows: list[Row], batch_tokens: int) -> list[list[Row]]:
    """Consecutive rows (longest first) while rows x longest row stays within batch_tokens; a longer row alone."""
    batches, current = [], []
    for row in rows:
        if current and (len(current) + 1) * len(current[0].tokens) > batch_tokens:
            batches.append(current)
            current = []
        current.append(row)
    return batches + ([current] if current else [])


@dataclass
class Collated:
    """One batch as tensors (on the CPU, pinned when the model is on a GPU)."""

    input_ids: object  # [batch, width]
    position_ids: object  # [batch, width]
    segments: object  # [batch, width], -1 for padding
    answer_rows: object  # [answer tokens] row of each scored token
    answer_positions: object  # [answer tokens]
    answer_targets: object  # [answer tokens]
    answer_request: object  # [answer tokens] index (within this batch's requests) of the request it belongs to
    requests: list[int]  # pass-wide request index of each of this batch's requests
    tokens: int
    padded_tokens: int


def collate(batch: list[Row], pin: bool) -> Collated:
    import torch

    width = len(batch[0].tokens)
    input_ids = torch.zeros(len(batch), width, dtype=torch.long)
    position_ids = torch.zeros(len(batch), width, dtype=torch.long)
    segments = torch.full((len(batch), width), -1, dtype=torch.long)
    rows, positions, targets, owners, requests = [], [], [], [], []
    for b, row in enumerate(batch):
        n = len(row.tokens)
        input_ids[b, :n] = torch.tensor(row.tokens)
        position_ids[b, :n] = torch.tensor(row.positions)
        segments[b, :n] = torch.tensor(row.segments)
        for answer in row.answers:
            rows += [b] * len(answer.targets)
            positions += answer.positions
            targets += answer.targets
            owners += [len(requests)] * len(answer.targets)
            requests.append(answer.request)
    tensors = [input_ids, position_ids, segments] + [torch.tensor(v, dtype=torch.long)
                                                     for v in (rows, positions, targets, owners)]
    if pin:
        tensors = [t.pin_memory() for t in tensors]
    return Collated(*tensors, requests=requests, tokens=sum(len(r.tokens) for r in batch),
                    padded_tokens=len(batch) * width)


def collated_ahead(batches: list[list[Row]], pin: bool, ahead: int) -> Iterator[Collated]:
    """Collate batches on a background thread, at most `ahead` in waiting, while the caller runs the model."""
    waiting: queue.Queue = queue.Queue(maxsize=max(1, ahead))
    stop = threading.Event()

    def work():
        try:
            for batch in batches:
                if stop.is_set():
                    return
                waiting.put(collate(batch, pin))
        except BaseException as err:  # surfaced in the caller's thread
            waiting.put(err)
        waiting.put(None)

    thread = threading.Thread(target=work, name="moelab-collate", daemon=True)
    thread.start()
    try:
        while (item := waiting.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                waiting.get_nowait()
            except queue.Empty:
                thread.join(0.05)


def attention_mask_4d(segments, dtype):
    """Additive [batch, 1, width, width] mask: causal, and a continuation token sees only the context (segment 0)
    and its own segment. Padding (-1) sees the context and other padding, so no row is fully masked."""
    import torch

    width = segments.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=segments.device).tril()
    allowed = causal & ((segments[:, None, :] == 0) | (segments[:, :, None] == segments[:, None, :]))
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segments.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def answer_logprobs(model, batch: Collated):
    """(sum of log-probabilities, all tokens greedy) per request of the batch, as float32 and bool tensors."""
    import torch

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    ids, positions, segments, rows, cols, targets, owners = (
        t.to(device, non_blocking=True) for t in (batch.input_ids, batch.position_ids, batch.segments,
                                                   batch.answer_rows, batch.answer_positions, batch.answer_targets,
                                                   batch.answer_request))
    mask = attention_mask_4d(segments, dtype)
    if model.config.model_type in HEAD_ONLY_MODEL_TYPES:
        hidden = model.base_model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                  use_cache=False).last_hidden_state
        logits = model.get_output_embeddings()(hidden[rows, cols])
    else:
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits[rows, cols]
    logprobs = logits.float().log_softmax(-1)
    token_logprobs = logprobs.gather(1, targets[:, None])[:, 0]
    greedy = logprobs.argmax(-1) == targets
    count = len(batch.requests)
    sums = torch.zeros(count, dtype=torch.float32, device=device).index_add_(0, owners, token_logprobs)
    misses = torch.zeros(count, dtype=torch.long, device=device).index_add_(0, owners, (~greedy).long())
    return sums, misses == 0


def score_batches(model, batches: list[list[Row]], options: ScheduleOptions, stats: ScheduleStats,
                  on_batch: Callable[[list[int], list[tuple[float, bool]]], None]) -> None:
    """Run each batch; after each, on_batch(request indices, [(loglikelihood, is_greedy)])."""
    import torch

    pin = next(model.parameters()).device.type == "cuda"
    with torch.inference_mode():
        for batch in collated_ahead(batches, pin, options.prefetch_batches):
            sums, greedy = answer_logprobs(model, batch)
            stats.tokens += batch.tokens
            stats.padded_tokens += batch.padded_tokens
            on_batch(batch.requests, list(zip(sums.tolist(), greedy.tolist())))


class RequestCache:
    """Scored requests appended to a JSON-lines file as batches finish, so that an interrupted pass resumes.

    A line holds a request's key (task, doc id, choice index), the task's fingerprint, its log-likelihood and
    greedy flag; lines of another fingerprint (the model, data or settings changed) are ignored.
    """

    def __init__(self, path: Path, fingerprints: dict[str, str]):
        self.path, self.fingerprints = Path(path), fingerprints
        self.known: dict[tuple[str, int, int], tuple[float, bool]] = {}
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                    if self.fingerprints.get(entry["task"]) == entry["fingerprint"]:
                        self.known[entry["task"], entry["doc"], entry["idx"]] = (entry["ll"], entry["greedy"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut short by the interruption

    def add(self, keys: list[tuple[str, int, int]], answers: list[tuple[float, bool]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            for (task, doc, idx), (ll, greedy) in zip(keys, answers):
                self.known[task, doc, idx] = (ll, greedy)
                f.write(json.dumps({"task": task, "fingerprint": self.fingerprints.get(task), "doc": doc,
                                    "idx": idx, "ll": ll, "greedy": greedy}) + "\n")


def scheduled_lm(hf_lm, options: ScheduleOptions, cache: RequestCache | None = None,
                 on_progress: Callable[[int, int], None] | None = None):
    """An lm-eval LM that answers log-likelihood requests with one scheduled pass over the hf backend's model and
    hands generation to the hf backend itself. Pass it to lm_eval.evaluator.evaluate with all tasks at once."""
    from lm_eval.api.model import LM

    class ScheduledLM(LM):
        def __init__(self):
            super().__init__()
            self.hf_lm, self.tokenizer, self.stats = hf_lm, hf_lm.tokenizer, ScheduleStats()

        def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            keys = [(r.task_name, r.doc_id, r.idx) for r in requests]
            known = cache.known if cache is not None else {}
            answers: list = [known.get(key) for key in keys]
            todo = [i for i, answer in enumerate(answers) if answer is None]
            self.stats.requests += len(requests)
            self.stats.cached += len(requests) - len(todo)
            started = time.perf_counter()
            encoded = encode_requests(hf_lm, [requests[i].args for i in todo])
            self.stats.tokenize_s += time.perf_counter() - started
            done = len(requests) - len(todo)

            def record(batch_requests: list[int], batch_answers: list[tuple[float, bool]]) -> None:
                nonlocal done
                for local, answer in zip(batch_requests, batch_answers):
                    answers[todo[local]] = answer
                if cache is not None:
                    cache.add([keys[todo[i]] for i in batch_requests], batch_answers)
                done += len(batch_requests)
                if on_progress:
                    on_progress(done, len(requests))

            started = time.perf_counter()
            rows = plan_rows(encoded, hf_lm.max_length)
            batches = batches_of(rows, options.batch_tokens)
            self.stats.rows += len(rows)
            self.stats.batches += len(batches)
            if len(options.replica_devices) > 1:
                from moelab.eval.parallel import score_replicated

                score_replicated(hf_lm.model, options.replica, list(options.replica_devices), batches, options,
                                 self.stats, record)
            else:
                score_batches(hf_lm.model, batches, options, self.stats, record)
            self.stats.score_s += time.perf_counter() - started
            if None in answers:
                raise RuntimeError(f"{answers.count(None)} requests were left unscored")
            return [(float(ll), bool(greedy)) for ll, greedy in answers]

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return hf_lm.loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return hf_lm.generate_until(requests, disable_tqdm=True)

    return ScheduledLM()


@contextmanager
def templates_compiled_once():
    """lm-eval compiles a Jinja template again for every document it renders, most of the time spent building
    requests (19 s of 20 for the 18 BIG-bench tasks x 250 items on 2 CPU cores); compile each template once instead.
    Same environment, same template, so the same text."""
    import lm_eval.utils

    original = lm_eval.utils.apply_template
    compiled = functools.lru_cache(maxsize=None)(lm_eval.utils.env.from_string)
    lm_eval.utils.apply_template = lambda template, doc: compiled(template).render(**doc)
    try:
        yield
    finally:
        lm_eval.utils.apply_template = original


def evaluate_in_one_pass(lm, tasks: list, settings, data_dir: Path | None, task_manager) -> dict:
    """TaskResult per task from one lm_eval.evaluator.evaluate over all tasks, so that lm-eval builds every request
    and computes every metric while `lm` answers all log-likelihood requests in one scheduled pass."""
    from lm_eval.evaluator import evaluate

    from moelab.eval.local import seed_as_simple_evaluate, task_config, task_result

    seed_as_simple_evaluate()
    loaded = task_manager.load([task_config(task, data_dir) for task in tasks])
    for lm_eval_task in loaded["tasks"].values():
        lm_eval_task.set_fewshot_seed(seed=1234)
    output = evaluate(lm=lm, task_dict=loaded, limit=settings.limit, log_samples=False)
    return {task.name: task_result(task, output) for task in tasks}


def run_scheduled(hf_lm, tasks: list, settings, data_dir: Path | None, task_manager, cache_file: Path,
                  fingerprints: dict[str, str], on_result: Callable, on_progress: Callable[[int, int], None],
                  options: ScheduleOptions):
    """Evaluate `tasks` with the moelab engine; on_result(task, TaskResult) as each is done. Returns ScheduleStats.

    The Nous tasks go in one pass. When their data does not read (a malformed --data-dir file), they are run again
    one at a time, so that the error names the file and the tasks before it are kept; scored requests come from the
    cache file then, so nothing is computed twice. Domain tasks (some generate) follow one at a time.
    """
    from moelab.eval.domain import DomainTask
    from moelab.eval.local import data_error_types, evaluate_task

    lm = scheduled_lm(hf_lm, options, RequestCache(cache_file, fingerprints), on_progress)
    nous = [task for task in tasks if not isinstance(task, DomainTask)]
    with templates_compiled_once():
        try:
            results = evaluate_in_one_pass(lm, nous, settings, data_dir, task_manager) if nous else {}
        except data_error_types() + (ConnectionError,) as err:
            # Offline without --data-dir: the task-by-task run below says which task and how to point at local data.
            if data_dir is None and not isinstance(err, ConnectionError):
                raise
            results = {}
            for task in nous:
                results[task.name] = evaluate_task(lm, task, settings, data_dir, task_manager)
                on_result(task, results[task.name])
            nous = []
        for task in nous:
            on_result(task, results[task.name])
        for task in tasks:
            if isinstance(task, DomainTask):
                on_result(task, evaluate_task(lm, task, settings, data_dir, task_manager))
    return lm.stats
