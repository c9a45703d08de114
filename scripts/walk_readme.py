"""Walk the README as a new user would: a fresh clone, a fresh virtualenv, then every command it shows, in order.

    python scripts/walk_readme.py [--repo .] [--pytest-args "-m 'not slow'"] [--timeout-s 1800] [--work DIR]

Each ```bash block of README.md is read top to bottom; a command runs in the clone (without ../shared beside it,
and with HF_HUB_OFFLINE=1: no network but PyPI's packages already installed) unless it needs what a walk cannot
have: a Hub model, dataset or account (names like org/..., the full suite without --data-dir), a GPU
(--device cuda) or a rented pod (--remote without --dry-run). Placeholders become the demo's model (out/my-moe ->
out/demo, built earlier by the README's build command), `moelab publish` runs with --dry-run and the leaderboard
reads reports/ without the README's example Gist. For each: exit code, seconds, and whether its output holds
what the README says it prints (CLAIMS). The virtualenv uses --system-site-packages, so that torch, transformers
and lm-eval come from this machine instead of a 5 GB download; `pip install -e` still installs moelab from the
clone. Results: reports/bench/readme_walk.json (scripts/bench_report.py, rewritten after every command) and a
markdown table on stdout. `--work DIR` continues an interrupted walk in its clone and venv (moelab's stages skip
what is done), as a user re-running the same commands would.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_report import write_bench_json  # noqa: E402

# What the README says a command prints (each string must appear in its stdout or stderr).
CLAIMS = {
    "moelab demo": ["Verdict:", "Bigbench", "artifacts, in reports/demo"],
    "python -m pytest": [" passed"],
    "moelab build recipes/demo-smollm2.yaml out/demo": ["built mixtral with 3 experts"],
    "moelab chat out/demo --prompt": ["assistant>", "expert usage"],
    "moelab chat out/demo --probe": ["routing accuracy"],
    "moelab eval out/demo --tasks Bigbench": ["wrote reports/SmolLM2-3x135M-demo/nous.json",
                                              "limited to 3 examples per task"],
    "--remote runpod --dry-run": ["dry run: nothing created", "MOELAB_WHEEL_FILE",
                                  "warning: RUNPOD_API_KEY is not set"],
    "moelab eval out/demo --tasks domains": ["wrote reports/SmolLM2-3x135M-demo/nous.json"],
    "moelab compare out/demo": ["Verdict:", "wrote reports/SmolLM2-3x135M-demo/compare/compare.md"],
    "moelab leaderboard": ["Leaderboard (Nous suite)", "SmolLM2-3x135M-demo (limited)"],
    "moelab publish out/": ["## Usage", "from_pretrained"],
    "moelab publish --gist": ["would create a secret Gist"],
}
NEEDS_THE_HUB = re.compile(r"(?<![\w/.-])(org|my-org|you|me|user)/|beyonder|https://gist|Beagle14")
PLACEHOLDERS = {"out/my-moe": "out/demo", "reports/my-moe/": "reports/SmolLM2-3x135M-demo/",
                " https://gist.github.com/user/<id> Beagle14-7B-Nous.md": ""}


def readme_commands(readme: str) -> list[str]:
    """The commands of every ```bash block, in order (comments and blank lines dropped, `\\` lines joined)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", readme, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            command = re.sub(r"\s+#.*$", "", line).strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


def why_not_run(command: str) -> str | None:
    if command.startswith("export "):
        return "sets a secret (none in a walk)"
    if "--remote" in command and "--dry-run" not in command:
        return "rents a RunPod GPU"
    if "--dry-run" not in command and NEEDS_THE_HUB.search(command):
        return "needs a Hub model, account or Gist"
    if "--device cuda" in command:
        return "needs a GPU"
    if re.match(r"moelab eval \S+", command) and "--data-dir" not in command and "--tasks domains" not in command \
            and "--dry-run" not in command:
        return "downloads the suite's datasets from the Hub"
    if "reports/moe.json" in command:
        return "a placeholder: your own report files"
    if command.startswith("pip install torch --index-url"):
        return "downloads torch (the walk's venv sees this machine's)"
    if command.startswith("python scripts/walk_readme.py"):
        return "this walk itself"
    if command.startswith("python scripts/bench_") or command.startswith("python scripts/make_"):
        return "a benchmark (see its own section)"
    return None


def as_walked(command: str, pytest_args: str) -> str:
    """The command as the walk runs it: publish as --dry-run, pytest with --pytest-args, [--json] dropped."""
    command = command.replace(" [--json]", "")
    for placeholder, demo in PLACEHOLDERS.items():
        command = command.replace(placeholder, demo)
    if command.startswith("moelab publish") and "--dry-run" not in command:
        command += " --dry-run"
    if command.endswith("python -m pytest") and pytest_args:
        command += " " + pytest_args
    if command.startswith("moelab chat out/demo") and "--prompt" not in command and "--probe" not in command:
        command = "printf 'Hello!\\n/quit\\n' | " + command + " --max-new-tokens 8"
    return command


def claims_for(command: str) -> list[str]:
    return next((claims for key, claims in CLAIMS.items() if key in command), [])


def save(args, clone: Path, steps: list[dict], continued: bool) -> None:
    ran = [s for s in steps if "skipped" not in s]
    write_bench_json("readme_walk", {
        "clone": args.repo, "commit": subprocess.run(["git", "-C", str(clone), "rev-parse", "HEAD"],
                                                     capture_output=True, text=True).stdout.strip(),
        "venv": "--system-site-packages (torch, transformers, lm-eval from this machine)",
        "pytest_args": args.pytest_args, "continued_an_interrupted_walk": continued,
        "ok": sum(s["exit_code"] == 0 and not s["claims_missing"] for s in ran), "ran": len(ran),
        "skipped": len(steps) - len(ran), "steps": steps})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]), help="what to clone (HEAD)")
    parser.add_argument("--pytest-args", default="-q -m 'not slow'", help="added to the README's pytest command")
    parser.add_argument("--timeout-s", type=int, default=1800, help="longest one command may take")
    parser.add_argument("--work", type=Path, help="the folder of an interrupted walk, to continue it")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="moelab-walk-"))
    clone, venv = work / "moelab", work / "venv"
    if args.work is None:
        subprocess.run(["git", "clone", "-q", args.repo, str(clone)], check=True)
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # A new user's cache is empty: the GGUF is dequantized and the LoRA experts merged during the walk.
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env['PATH']}", VIRTUAL_ENV=str(venv), HF_HUB_OFFLINE="1",
               COLUMNS="80", PIP_DISABLE_PIP_VERSION_CHECK="1", MOELAB_CACHE=str(work / "moelab-cache"))
    env.pop("RUNPOD_API_KEY", None), env.pop("GITHUB_TOKEN", None), env.pop("HF_TOKEN", None)
    assert not (clone.parent / "shared").exists()

    steps, ran_before = [], set()
    for command in readme_commands((clone / "README.md").read_text()):
        walked = as_walked(command, args.pytest_args)
        reason = why_not_run(walked) or ("ran above" if walked.split(" && ")[-1] in ran_before else None)
        ran_before.add(walked.split(" && ")[-1])
        if reason:
            steps.append({"command": command, "skipped": reason})
            print(f"skip  {command}  ({reason})", flush=True)
            continue
        print(f"run   {walked}", flush=True)
        started = time.perf_counter()
        try:
            done = subprocess.run(["bash", "-c", walked], cwd=clone, env=env, capture_output=True, text=True,
                                  timeout=args.timeout_s)
            code, output = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as err:
            code, output = "timeout", f"{err.stdout or ''}{err.stderr or ''}"
        seconds = round(time.perf_counter() - started, 1)
        missing = [claim for claim in claims_for(command) if claim not in " ".join(output.split())]
        steps.append({"command": command, "walked": walked, "exit_code": code, "seconds": seconds,
                      "claims": claims_for(command), "claims_missing": missing,
                      "output_tail": output[-1500:] if code != 0 or missing else ""})
        print(f"      exit {code} in {seconds} s" + (f"; missing: {missing}" if missing else ""), flush=True)
        save(args, clone, steps, continued=args.work is not None)
    save(args, clone, steps, continued=args.work is not None)
    print("\n| command | exit | seconds | output as claimed |\n|---|---:|---:|---|")
    for step in steps:
        if "skipped" in step:
            print(f"| `{step['command']}` | skipped | | {step['skipped']} |")
        else:
            claimed = "yes" if not step["claims_missing"] else "no: " + ", ".join(step["claims_missing"])
            print(f"| `{step['walked']}` | {step['exit_code']} | {step['seconds']} | {claimed} |")
    print(f"\nclone and venv in {work} (remove them when done)")


if __name__ == "__main__":
    main()
