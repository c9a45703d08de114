"""The `moelab` command line: parse arguments, call one stage, print its result. No logic lives here."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.text import Text

from moelab.errors import MoelabError, check_number
from moelab.eval.remote import DEFAULT_GPU, DEFAULT_IMAGE  # light: defaults for --help
from moelab.recipe import MAX_SEED
from moelab.redact import clean_secret, mask, secret_from_env
from moelab.run import DEMO_LIMIT  # light: a default for --help
from moelab.signals import Interrupted, reported, stop_signals_unwind

app = typer.Typer(
    help="Build Mixture-of-Experts models from dense fine-tunes, then probe, evaluate, compare and publish them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)
MAX_TOKENS = 10**6


@app.callback()
def moelab() -> None:
    """recipe -> build -> model -> chat/eval -> report -> compare/leaderboard -> publish"""


@app.command()
def build(
    recipe: Path = typer.Argument(..., help="Recipe YAML (mergekit-moe format; see README)."),
    out: Path = typer.Argument(..., help="Output model folder. Written to a temporary folder beside it, then renamed."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    device: str = typer.Option("auto", help="Where the router hidden-state pass runs: cpu, cuda or auto."),
    load_in_4bit: bool = typer.Option(False, "--load-in-4bit", help="Run the hidden-state pass in 4-bit (bitsandbytes, CUDA)."),
    load_in_8bit: bool = typer.Option(False, "--load-in-8bit", help="Run the hidden-state pass in 8-bit (bitsandbytes, CUDA)."),
    shard_size: str = typer.Option("5GB", help="Largest output shard, in bytes (e.g. 5GB, 500MB)."),
    seed: Optional[int] = typer.Option(None, help="Seed for random gates and noise_scale (default: the recipe's seed, 0)."),
    allow_identical_experts: bool = typer.Option(
        False, "--allow-identical-experts", "--i-understand-this-is-not-useful-without-training",
        help="Allow a recipe whose experts are all the same model."),
):
    """Merge the dense experts of RECIPE into a Mixture-of-Experts model folder OUT."""
    from moelab.build import BuildOptions, build_moe
    from moelab.recipe import load_recipe

    check_number("--seed", seed, 0, MAX_SEED)
    shard_bytes = parse_size(shard_size)
    parsed, text = load_recipe(recipe, allow_identical_experts)
    options = BuildOptions(device=device, load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit,
                           shard_bytes=shard_bytes, seed=seed, force=force)
    result = build_moe(parsed, text, out, options, recipe_dir=recipe.parent)
    console.print(f"[green]built[/green] {result.architecture} with {result.num_experts} experts "
                  f"({result.total_bytes / 1e9:.2f} GB in {result.num_shards} shard(s)) at {out}")
    if result.routing is not None:
        Console().print(routing_table(result.routing))
    if result.heal is not None:
        Console().print(heal_table(result.heal))
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/yellow] {mask(warning)}", soft_wrap=True)


def routing_table(report):
    """Held-out routing of gate_mode trained or ridge: per-expert accuracy and balance, hidden vs fitted gates."""
    from rich.table import Table

    table = Table(title=f"routing of {report.heldout_tokens} held-out token-layer choices (top-1)",
                  caption=f"{report.mode} fit: {report.fit_s:.2f} s", caption_justify="left")
    for column in ("expert", "hidden", report.mode):
        table.add_column(column, justify="left" if column == "expert" else "right")
    for name, accuracy in report.fitted.accuracy.items():
        table.add_row(name, f"{report.hidden.accuracy[name]:.3f}", f"{accuracy:.3f}")
    table.add_row("overall", f"{report.hidden.overall:.3f}", f"{report.fitted.overall:.3f}", style="bold")
    table.add_row("imbalance (CV)", f"{report.hidden.balance_cv:.3f}", f"{report.fitted.balance_cv:.3f}")
    return table


def heal_table(report):
    """Held-out KL to each domain's teacher and NLL of its data, before and after the heal step."""
    from rich.table import Table

    table = Table(title=f"heal: {report.steps} steps of {', '.join(report.parts)} ({report.trainable_params:,} "
                        f"parameters, {report.seconds:.0f} s); held-out tokens")
    for column in ("domain", "tokens", "KL before", "KL after", "NLL before", "NLL after", "NLL teacher"):
        table.add_column(column, justify="left" if column == "domain" else "right")
    for name, d in report.domains.items():
        table.add_row(name, str(d.heldout_tokens), f"{d.kl_before:.4f}", f"{d.kl_after:.4f}", f"{d.nll_before:.3f}",
                      f"{d.nll_after:.3f}", f"{d.nll_teacher:.3f}")
    return table


@app.command()
def chat(
    model: str = typer.Argument(..., help="MoE model folder (e.g. from moelab build) or Hub repo id."),
    prompt: Optional[list[str]] = typer.Option(None, "--prompt", help="Answer this and exit (repeat for more turns)."),
    max_new_tokens: int = typer.Option(256, help="Longest answer, in tokens."),
    temperature: float = typer.Option(0.7, help="Sampling temperature; 0 for greedy."),
    top_p: float = typer.Option(0.9, help="Nucleus sampling threshold."),
    seed: int = typer.Option(0, help="Seed, set before every answer."),
    device: str = typer.Option("auto", help="cpu, cuda or auto."),
    dtype: str = typer.Option("auto", help="auto (as stored), bfloat16, float16 or float32."),
    trace: Optional[Path] = typer.Option(None, help="Write every turn's routing (token, layer, top-k ids, weights)."),
    heatmap: Optional[Path] = typer.Option(None, help="Write a PNG of the latest turn's routing."),
    probe: Optional[Path] = typer.Option(None, help="Route labelled prompts (YAML/JSONL of expert, text); no chat."),
    json_output: bool = typer.Option(False, "--json", help="With --probe: print the result as JSON."),
):
    """Chat with MODEL and see which expert the router sends each token to; or --probe labelled prompts."""
    import json

    from rich.console import Console as StdoutConsole

    from moelab.chat import ChatSession, GenerationSettings, probe_view, run_chat
    from moelab.probe import load_labelled_prompts, load_moe, moe_folder, probe_routing

    check_number("--max-new-tokens", max_new_tokens, 1, MAX_TOKENS)
    check_number("--temperature", temperature, 0, 100)
    check_number("--top-p", top_p, 0, 1, low_inclusive=False)
    check_number("--seed", seed, 0, MAX_SEED)
    if probe is not None and (prompt or trace or heatmap):
        raise MoelabError("--probe routes labelled prompts without chatting; drop --prompt, --trace and --heatmap")
    if json_output and probe is None:
        raise MoelabError("--json prints a --probe result; add --probe FILE or drop --json")
    folder, expert_names = moe_folder(model)  # checks, before the weights load
    prompts = load_labelled_prompts(probe, expert_names) if probe is not None else []
    moe = load_moe(str(folder), device, dtype)
    console.print(f"{model}: {len(moe.expert_names)} experts ({', '.join(moe.expert_names)}) "
                  f"in {len(moe.layers)} MoE layers", highlight=False)
    out = StdoutConsole()
    if probe is not None:
        result = probe_routing(moe, prompts, show_progress=not json_output)
        if json_output:
            print(json.dumps(result.to_json(), indent=1))
        else:
            out.print(probe_view(result))
        return
    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    run_chat(ChatSession(moe, settings), prompt or [], out, trace, heatmap, model)


@app.command()
def compare(
    inputs: list[Path] = typer.Argument(..., help="MOE_REPORT EXPERT_REPORT... (JSON from moelab eval), or one "
                                                   "MODEL_DIR built by moelab build."),
    reports_dir: Path = typer.Option(Path("reports"), help="MODEL_DIR mode: where the reports are "
                                                           "(reports/<model-name>/nous.json)."),
    run_missing: bool = typer.Option(False, "--run-missing", help="MODEL_DIR mode: evaluate experts without a "
                                                                  "report, with the MoE report's settings."),
    data_dir: Optional[Path] = typer.Option(None, help="With --run-missing: local task data, as for moelab eval."),
    device: str = typer.Option("auto", help="With --run-missing: cpu, cuda or auto."),
    probe: Optional[Path] = typer.Option(None, help="Routing shares: the JSON of `moelab chat MODEL --probe PROMPTS "
                                                    "--json`, or (MODEL_DIR mode) the PROMPTS file itself."),
    out: Optional[Path] = typer.Option(None, help="Folder for compare.md, compare.csv and compare.png "
                                                  "(default: REPORTS_DIR/<moe-name>/compare)."),
):
    """Is the MoE better than its experts? Scores per task and group, deltas with significance, a verdict."""
    from moelab.compare import compare_inputs, comparison_view, write_comparison

    comparison = compare_inputs(inputs, reports_dir, run_missing, data_dir, device, probe)
    written = write_comparison(comparison, out or reports_dir / comparison.moe / "compare")
    Console().print(comparison_view(comparison))
    console.print("wrote " + ", ".join(str(p) for p in written), highlight=False)


@app.command()
def leaderboard(
    sources: Optional[list[str]] = typer.Argument(None, help="Eval reports (.json), AutoEval gists (MODEL-Nous.md), "
                                                             "folders of them, or Gist ids/URLs (default: reports)."),
    out: Path = typer.Option(Path("reports/leaderboard"), help="Folder for leaderboard .md, .csv, .html and .png."),
    github_token: Optional[str] = typer.Option(None, help="Token for private Gists (default: $GITHUB_TOKEN).",
                                               show_default=False),
    github_api_url: Optional[str] = typer.Option(None, help="GitHub API base URL, for GitHub Enterprise "
                                                            "(default: https://api.github.com)."),
):
    """Rank models by their Nous scores (AGIEval, GPT4All, TruthfulQA, Bigbench, Average)."""
    from moelab.leaderboard import collect_entries, leaderboard_table, leaderboard_view, write_leaderboard

    entries = collect_entries(sources or ["reports"], clean_secret(github_token) or secret_from_env("GITHUB_TOKEN"),
                              github_api_url)
    table = leaderboard_table(entries)
    written = write_leaderboard(table, out)
    Console().print(leaderboard_view(table))
    console.print("wrote " + ", ".join(str(p) for p in written), highlight=False)


@app.command("eval")
def eval_command(
    model: str = typer.Argument(..., help="Model folder (e.g. from moelab build) or Hub repo id."),
    tasks: str = typer.Option("all", help="Comma list of groups (AGIEval, GPT4All, TruthfulQA, Bigbench) and/or "
                                          "tasks (e.g. bigbench_navigate,truthfulqa_mc); 'domains' for the "
                                          "eval_data of the model's recipe experts, or a domain tasks FILE.yaml."),
    limit: Optional[int] = typer.Option(None, help="At most N examples per task (a smoke test; marked as limited)."),
    data_dir: Optional[Path] = typer.Option(None, help="Offline task data: bigbench/<task>.jsonl, agieval/, "
                                                       "gpt4all/, truthfulqa/ (default: download from the Hub)."),
    output: Optional[Path] = typer.Option(None, help="Report JSON (default: reports/<model-name>/nous.json)."),
    backend: str = typer.Option("hf", help="lm-eval backend: hf, or vllm (GPU, when installed)."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N or auto."),
    dtype: str = typer.Option("auto", help="auto (float16 on GPU as AutoEval, float32 on CPU), bfloat16, float16 "
                                           "or float32."),
    engine: str = typer.Option("auto", help="moelab: all tasks in one scheduled pass, each shared context run "
                                            "once (hf backend); lm-eval: lm-eval's own loop, task by task; auto: "
                                            "moelab for hf, lm-eval for vllm."),
    batch_tokens: Optional[int] = typer.Option(None, help="moelab engine: tokens per forward pass, padding "
                                                          "included (default: 32768 on GPU, 4096 on CPU)."),
    parallel: str = typer.Option("auto", help="Several GPUs: replicas (one model per GPU, requests split; moelab "
                                              "engine), shard (one model across them), single; auto: replicas when "
                                              "the weights fit one GPU, else shard."),
    gpus: Optional[int] = typer.Option(None, help="Use this many of the visible GPUs (default: all)."),
    batch_size: str = typer.Option("auto", help="lm-eval engine and generation tasks: batch size, or auto (probed "
                                                "on GPU; 8 on CPU)."),
    max_length: Optional[int] = typer.Option(None, help="Longest context in tokens (default: the model's)."),
    remote: Optional[str] = typer.Option(None, help="Run on a rented GPU pod instead: runpod (needs RUNPOD_API_KEY "
                                                    "and GITHUB_TOKEN with gist scope; the pod is always removed).",
                                         rich_help_panel="Remote"),
    gpu: str = typer.Option(DEFAULT_GPU, help="RunPod GPU type id.", rich_help_panel="Remote"),
    gpu_count: int = typer.Option(1, help="GPUs on the pod.", rich_help_panel="Remote"),
    cloud: str = typer.Option("secure", help="RunPod cloud: secure or community.", rich_help_panel="Remote"),
    image: str = typer.Option(DEFAULT_IMAGE, help="Pod container image.", rich_help_panel="Remote"),
    disk_gb: int = typer.Option(100, help="Pod container disk in GB (holds the model).", rich_help_panel="Remote"),
    timeout_min: float = typer.Option(240.0, help="Give up (and remove the pod) after this many minutes.",
                                      rich_help_panel="Remote"),
    install: Optional[str] = typer.Option(None, help="pip requirement, URL or path the pod installs moelab from "
                                                     "(default: this moelab, sent as a wheel in the run's Gist).",
                                          rich_help_panel="Remote"),
    keep_pod: bool = typer.Option(False, "--keep-pod", help="Debugging only: leave the pod running (and billing).",
                                  rich_help_panel="Remote"),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the pod specification (secrets masked); create "
                                                          "nothing.", rich_help_panel="Remote"),
    push: Optional[str] = typer.Option(None, help="Upload the local MODEL folder to this Hub repo first (HF_TOKEN), "
                                                  "so the pod can download it.", rich_help_panel="Remote"),
    runpod_api_key: Optional[str] = typer.Option(None, help="RunPod API key (default: $RUNPOD_API_KEY).",
                                                 show_default=False, rich_help_panel="Remote"),
):
    """Evaluate MODEL on the Nous suite (AutoEval's tasks and scoring) through lm-eval; resumes an interrupted run."""
    from rich.console import Console as StdoutConsole

    from moelab.eval import EvalSettings, run_eval
    from moelab.eval.local import default_report_path
    from moelab.eval.report import report_view

    check_number("--limit", limit, 1)
    check_number("--max-length", max_length, 1, MAX_TOKENS)
    settings = EvalSettings(tasks=tasks.split(","), limit=limit, backend=backend, device=device, dtype=dtype,
                            batch_size=batch_size, max_length=max_length, engine=engine, batch_tokens=batch_tokens,
                            parallel=parallel, gpus=gpus)
    report_path = output or default_report_path(push or model)
    if remote is not None:
        from moelab.eval.remote import RemoteOptions

        options = RemoteOptions(gpu, gpu_count, cloud, image, disk_gb, timeout_min, install, keep_pod)
        eval_on_pod(remote, model, settings, data_dir, report_path, options, push, runpod_api_key, dry_run)
        return
    report = run_eval(model, settings, data_dir, report_path)
    StdoutConsole().print(report_view(report))
    console.print(f"wrote {report_path}", highlight=False)


def eval_on_pod(remote: str, model: str, settings, data_dir: Optional[Path], report_path: Path, options, push,
                runpod_api_key: Optional[str], dry_run: bool) -> None:
    """`moelab eval --remote runpod`: print the pod's progress, then the report as a local run does."""
    from rich.console import Console as StdoutConsole

    from moelab.eval.remote import Secrets, planned_pod, pod_spec_view, progress_line, run_remote_eval
    from moelab.eval.report import report_view

    if remote != "runpod":
        raise MoelabError(f"--remote {remote} is not supported; use --remote runpod")
    if data_dir is not None:
        raise MoelabError("--data-dir is a folder on this machine, which the pod cannot read; drop it with --remote "
                          "(the pod downloads the task data from the Hub)")
    secrets = Secrets.from_env(runpod_api_key)
    if dry_run:
        StdoutConsole().print(pod_spec_view(planned_pod(model, settings, options, secrets, push)))
        for name in secrets.missing():
            console.print(f"[yellow]warning:[/yellow] {name} is not set; a real run needs it (see `moelab eval "
                          "--help`)", highlight=False)
        return
    if options.keep_pod:
        console.print("[bold yellow]WARNING --keep-pod: the pod keeps running and billing after the eval; remove it "
                      "yourself (runpodctl remove pod ID)[/bold yellow]")
    with console.status("creating the pod") as status:
        shown_states = []

        def show(progress) -> None:
            if progress.state not in shown_states[-1:]:
                console.print(progress_line(progress), highlight=False)
                shown_states.append(progress.state)
            status.update(progress_line(progress))

        result = run_remote_eval(model, settings, report_path, options, secrets, push, on_progress=show)
    StdoutConsole().print(report_view(result.report))
    cost = "" if result.cost_usd is None else f" for about ${result.cost_usd:.2f}"
    console.print(f"wrote {report_path} (gist {result.gist_url}); pod {result.pod_id} ran "
                  f"{result.elapsed_s / 60:.1f} min{cost}", highlight=False)


@app.command()
def publish(
    model_dir: Optional[Path] = typer.Argument(None, help="Model folder written by moelab build."),
    repo: Optional[str] = typer.Option(None, help="Hub repo to upload MODEL_DIR to, as user/name (created if "
                                                  "missing); with --gist, the repo the Gist links to."),
    private: bool = typer.Option(False, "--private", help="Create the Hub repo private."),
    report: Optional[Path] = typer.Option(None, help="Eval report JSON whose scores go into the model card."),
    gist: Optional[Path] = typer.Option(None, help="Instead: post this eval report as a Gist (AutoEval layout); "
                                                   "a re-run updates the same Gist."),
    public: bool = typer.Option(False, "--public", help="With --gist: a public Gist (default: secret)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show every file and the card or Gist text; send nothing."),
    token: Optional[str] = typer.Option(None, help="Hub token (default: $HF_TOKEN), or GitHub token with --gist "
                                                   "(default: $GITHUB_TOKEN).", show_default=False),
    github_api_url: Optional[str] = typer.Option(None, help="With --gist: GitHub API base URL, for GitHub "
                                                            "Enterprise (default: $GITHUB_API_URL or "
                                                            "https://api.github.com)."),
):
    """Upload MODEL_DIR to the Hub with a regenerated card (--repo), or post an eval report as a Gist (--gist)."""
    from rich.console import Console as StdoutConsole

    from moelab.publish import plan_gist, publish_gist, publish_model, upload_view

    out = StdoutConsole()
    if (model_dir is None) == (gist is None):
        raise MoelabError("give either MODEL_DIR --repo user/name, or --gist REPORT")
    if gist is not None:
        if dry_run:
            plan = plan_gist(gist, public, repo)
            action = (f"update Gist {plan.gist_id}" if plan.gist_id
                      else f"create a {'public' if public else 'secret'} Gist")
            console.print(f"dry run: would {action} with {plan.filename} ({len(plan.content)} characters):",
                          highlight=False)
            out.print(plan.content, markup=False, highlight=False, soft_wrap=True)  # verbatim: no hard wraps
            return
        gist_id = publish_gist(gist, clean_secret(token), public, github_api_url, repo)
        console.print(f"[green]published[/green] https://gist.github.com/{gist_id} (id saved in {gist})",
                      highlight=False)
        return
    if repo is None:
        raise MoelabError("--repo user/name is needed to publish a model folder")
    upload = publish_model(model_dir, repo, clean_secret(token), private, report, dry_run, show_progress=True)
    out.print(upload_view(upload))
    if dry_run:
        out.print(upload.card, markup=False, highlight=False, soft_wrap=True)  # verbatim: no hard wraps
    elif upload.commit_url is None:
        console.print(f"[green]up to date[/green]: {repo} already holds every file", highlight=False)
    else:
        console.print(f"[green]published[/green] {len(upload.uploaded)} file(s) to {upload.repo_url} "
                      f"({len(upload.unchanged)} unchanged): {upload.commit_url}", highlight=False)


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="Recipe YAML to build, probe, evaluate, compare and report on."),
    out: Optional[Path] = typer.Option(None, help="Folder for the model and every report (default: "
                                                  "reports/<recipe name>)."),
    eval_tasks: str = typer.Option("Bigbench", help="Comma list of groups and/or tasks, as moelab eval --tasks."),
    limit: Optional[int] = typer.Option(None, help="At most N examples per task (a smoke test; marked as limited)."),
    data_dir: Optional[Path] = typer.Option(None, help="Offline task data, as moelab eval --data-dir (default: the "
                                                       "Hub)."),
    probe: Optional[Path] = typer.Option(None, help="Labelled prompts (YAML/JSONL of expert, text) for the routing "
                                                    "probe (default: RECIPE's <stem>.probe.yaml, if present)."),
    device: str = typer.Option("auto", help="cpu, cuda or auto."),
    remote: Optional[str] = typer.Option(None, help="Also evaluate the MoE on a rented GPU: runpod (needs --publish "
                                                    "for the upload, RUNPOD_API_KEY and GITHUB_TOKEN)."),
    publish: Optional[str] = typer.Option(None, help="Upload the MoE to this Hub repo (user/name) at the end "
                                                     "(HF_TOKEN)."),
    mergekit_baseline: bool = typer.Option(False, help="Also build the experts mergekit-moe's way (shared base "
                                                       "weights, hidden gates) and compare both retentions (needs "
                                                       "domains in --eval-tasks)."),
):
    """The whole loop: build, routing probe, eval of the MoE and its experts, compare, reports; skips what is done.

    A stage whose outputs were made from the same recipe, model and settings is skipped, so a re-run after a
    failure continues where it stopped."""
    check_number("--limit", limit, 1)
    from moelab.recipe import load_recipe
    from moelab.run import RunConfig, run_name

    name = run_name(load_recipe(recipe)[0], recipe)
    run_loop(RunConfig(recipe, out or Path("reports") / name, eval_tasks.split(","), limit, data_dir, probe, device,
                       remote, publish, mergekit_baseline))


@app.command()
def demo(
    out: Path = typer.Option(Path("reports/demo"), help="Folder for the demo MoE and every report."),
    limit: int = typer.Option(DEMO_LIMIT, help="Examples per task (the shipped BIG-bench subset)."),
    eval_tasks: Optional[str] = typer.Option(None, help="Comma list of tasks (default: the shipped subset)."),
    device: str = typer.Option("auto", help="cpu, cuda or auto."),
):
    """The whole loop offline: a 3-expert MoE (chat, math, code) from SmolLM2-135M-Instruct vs its experts.

    moelab's build (merged shared weights, fitted routers) next to mergekit-moe's way (shared base, hidden gates):
    how much of each expert's domain skill each keeps, then a BIG-bench subset shipped with moelab. In minutes on a
    CPU; writes reports/demo/."""
    from moelab.run import demo_config

    check_number("--limit", limit, 1)
    run_loop(demo_config(out, limit, eval_tasks.split(",") if eval_tasks else None, device))


def run_loop(config) -> None:
    """`run` and `demo`: the time estimate, one line per stage, then the results and where every artifact is."""
    import time

    from rich.console import Console as StdoutConsole
    from rich.table import Table

    from moelab.compare import comparison_view
    from moelab.run import TIME_BUDGET_S, all_up_to_date, estimate_run, final_comparison, plan_stages, run_stages

    stages = plan_stages(config)
    estimate = None if all_up_to_date(stages, config.out) else estimate_run(config)
    if estimate is not None:
        domains = f" and {estimate.domain_items} domain items" if estimate.domain_items else ""
        console.print(f"{estimate.models} models x {estimate.requests_per_model} scored choices{domains} each: about "
                      f"{estimate.seconds / 60:.0f} min on 2 idle CPU cores from scratch (more when they are busy)",
                      highlight=False)
        if estimate.over_budget:
            console.print(f"[yellow]warning:[/yellow] that is over {TIME_BUDGET_S // 60} min; lower --limit or "
                          "drop tasks for a quicker run")
    started, cpu_started = time.perf_counter(), time.process_time()
    outcomes = run_stages(stages, config.out,
                          on_start=lambda s: console.print(f"[bold]>[/bold] {s.name}: {s.summary}", highlight=False),
                          on_done=lambda o: console.print(
                              f"  [green]done[/green] in {o.seconds:.0f} s" if o.status == "ran"
                              else "  [dim]up to date[/dim]"))
    out = StdoutConsole()
    if config.mergekit_baseline and (Path(config.out) / "retention.md").is_file():
        out.print((Path(config.out) / "retention.md").read_text(), markup=False, highlight=False, soft_wrap=True)
    comparison = final_comparison(config)
    if comparison is not None:
        out.print(comparison_view(comparison))
    table = Table(title=f"artifacts, in {config.out}", title_justify="left")
    for column in ("stage", "status", "files"):
        table.add_column(column)
    for outcome in outcomes:
        table.add_row(outcome.name, outcome.status if outcome.status != "ran" else f"ran ({outcome.seconds:.0f} s)",
                      "\n".join(str(p.relative_to(config.out)) for p in outcome.outputs))
    out.print(table)
    console.print(f"finished in {(time.perf_counter() - started) / 60:.1f} min "
                  f"({(time.process_time() - cpu_started) / 60:.1f} min of CPU time)", highlight=False)


def parse_size(text: str) -> int:
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    number = text.strip().upper().rstrip("S")
    digits = number.rstrip("KMGTIB")
    try:
        size = int(float(digits) * units[number[len(digits):]])
    except (ValueError, KeyError, OverflowError):
        raise MoelabError(f"cannot read size '{text}'; write it like 5GB, 500MB or 1000000") from None
    if size <= 0:
        raise MoelabError(f"size must be positive; got '{text}'")
    return size


def is_click_error(err: Exception) -> bool:
    """Click's own exceptions (Typer vendors click in recent versions, so they are told by their class names)."""
    return any(cls.__name__ in ("ClickException", "Abort") for cls in type(err).__mro__)


def exit_on_click_error(err: Exception) -> None:
    """A bad option or argument, caught by Typer before moelab's own checks: one line, as moelab's errors."""
    name = type(err).__name__
    if name in ("NoArgsIsHelpError", "Abort"):  # bare `moelab` (Typer printed its help); Ctrl-D at a prompt
        sys.exit(2 if name == "NoArgsIsHelpError" else 1)
    command = getattr(getattr(err, "ctx", None), "command_path", None) or "moelab"
    print_error(f"{err.format_message()} (see {command} --help)")
    sys.exit(err.exit_code)


def print_error(message: str) -> None:
    """One red `error:` line, secrets masked. Text, not markup: a message may hold brackets (moelab[eval], a
    recipe's text), and a quoted recipe value may hold a newline."""
    console.print(Text.assemble(("error:", "red"), " ", " ".join(mask(message).splitlines())), highlight=False,
                  soft_wrap=True)


def main() -> None:
    # Libraries' own progress bars, advice and deprecation notices (FutureWarning) would bury moelab's output and
    # land inside chat answers; the user cannot act on them. Setting these variables (or PYTHONWARNINGS) turns
    # them back on.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TQDM_DISABLE", "1")
    if not sys.warnoptions:
        warnings.filterwarnings("ignore", category=FutureWarning)
    with stop_signals_unwind():
        try:
            code = app(standalone_mode=False, prog_name="moelab")  # usage errors reach the one-line handler
            if isinstance(code, int):  # --help and typer.Exit: their exit code
                sys.exit(code)
        except MoelabError as err:
            print_error(str(err))
            sys.exit(2)
        except Interrupted as stop:
            reported()
            console.print(f"[red]interrupted[/red] ({stop.signal_name})", highlight=False)
            sys.exit(stop.code)
        except Exception as err:
            if is_click_error(err):
                exit_on_click_error(err)
            # A bug: trace back, but never with a secret in it.
            import traceback

            sys.stderr.write(mask(traceback.format_exc()))
            sys.stderr.flush()
            sys.exit(1)
