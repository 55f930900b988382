"""guidellm, the outside client of `pdserve bench external`: its own environment, its command line, its report.

Contract.
- `ensure_guidellm(venv)` returns the `guidellm` executable inside `venv`, after creating that virtual environment
  and installing `guidellm==VERSION` into it when it is missing or holds another version. It never installs into
  the environment running this code (guidellm pins its own torch, transformers and httpx): a `venv` that is that
  environment raises `ValueError`.
- `level_command(exe, target_url, streams, workload, out, seed)` is one `guidellm run`: a concurrent profile of
  `streams` streams, synthetic text of `workload`'s prompt and output tokens (guidellm sends `ignore_eos`, so every
  request runs to its output length) drawn with `seed`, stopped after `workload.seconds` (guidellm then cancels what
  is in flight: those requests are "incomplete"), its JSON report written to `out`. guidellm draws the same prompts
  for the same seed, and an engine with prefix caching serves a prompt it has seen in a fraction of the time: every
  level of one target needs a seed of its own. `guidellm_env()` is its environment: no model hub.
- `parse_report(data)` reads that JSON report (guidellm 0.8.1's schema) into one `LevelRun` per benchmark in it,
  with guidellm's own per-request figures: TTFT (first token's arrival minus the request's start) and ITL (last
  token minus first token over output tokens - 1, which is `pdserve bench serve`'s TPOT), the counts per status,
  and the output tokens every request streamed. Latencies cover every request that got that far, the ones guidellm
  cut off at the end of the level included: at 16 streams a 30 s level finishes few requests, and the ones it
  finishes are those that started first, so the successful ones alone would leave the slow first tokens out
  (guidellm's own console counts successful requests only).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

VERSION = "0.8.1"
_STATUSES = ("successful", "errored", "incomplete")


@dataclass(frozen=True)
class Workload:
    """What guidellm sends at every level."""

    prompt_tokens: int
    output_tokens: int
    seconds: int  # per level
    tokenizer: str  # the model folder: guidellm sizes its synthetic prompts with the model's own tokenizer


@dataclass(frozen=True, slots=True)
class LevelRun:
    """One guidellm benchmark (one concurrency level, one run) as guidellm measured it."""

    streams: int
    ttfts_ms: tuple[float, ...]  # every request that got its first token (successful and cut off)
    itls_ms: tuple[float, ...]  # every request that got 2+ tokens (successful and cut off)
    finished_ttfts_ms: tuple[float, ...]  # the successful requests'
    successful: int
    errored: int
    incomplete: int  # cancelled by guidellm when the level's time was up
    duration_s: float
    start: float  # time.time() of the measurement's start and end
    end: float
    output_tokens: int  # streamed to guidellm, every request (incomplete ones too)
    first_error: str | None = None

    @property
    def req_per_s(self) -> float:
        """Successful requests per second of the level."""
        return self.successful / self.duration_s if self.duration_s > 0 else 0.0


# ---- its environment ---------------------------------------------------------------------------------------


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def installed_version(venv: Path) -> str | None:
    """guidellm's version in `venv`, from its distribution metadata folder; None when it is not there."""
    found = sorted(venv.glob("lib/python*/site-packages/guidellm-*.dist-info"))
    return found[-1].name.removeprefix("guidellm-").removesuffix(".dist-info") if found else None


def ensure_guidellm(venv: Path) -> Path:
    """The `guidellm` executable of `venv`, which is created and filled first where needed (progress on stdout)."""
    exe = venv / "bin" / "guidellm"
    if installed_version(venv) == VERSION and exe.exists():
        return exe
    if venv.resolve() == Path(sys.prefix).resolve():
        raise ValueError(f"{venv} is the environment running pdserve; guidellm needs one of its own")
    if not venv_python(venv).exists():
        print(f"creating {venv}: a virtual environment for guidellm alone", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    print(f"installing guidellm=={VERSION} into {venv} (with its dependencies, torch among them: several GB, "
          "a few minutes the first time)", flush=True)
    subprocess.run([str(venv_python(venv)), "-m", "pip", "install", "--disable-pip-version-check", "-q",
                    f"guidellm=={VERSION}"], check=True)
    if installed_version(venv) != VERSION:
        raise RuntimeError(f"guidellm=={VERSION} is not in {venv} after installing it")
    return exe


def guidellm_env() -> dict[str, str]:
    """guidellm's environment: this one, with the model hub off (the tokenizer is a local folder)."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def level_command(exe: Path, target_url: str, streams: int, workload: Workload, out: Path, seed: int) -> list[str]:
    """`guidellm run` for one concurrency level; `target_url` is the server's root ("http://HOST:PORT")."""
    return [
        str(exe), "run",
        "--backend", f"kind=openai_http,target={target_url}",
        "--tokenizer", f"kind=huggingface_auto,model={workload.tokenizer}",
        "--data", f"kind=synthetic_text,prompt_tokens={workload.prompt_tokens},"
                  f"output_tokens={workload.output_tokens}",
        "--profile", f"kind=concurrent,streams={streams}",
        "--constraint", f"kind=max_duration,seconds={workload.seconds}",
        "--seed", f"kind=static,value={seed}",
        "--output", f"kind=json,path={out}",
        "--disable-console-interactive",
    ]


# ---- its report ---------------------------------------------------------------------------------------------


def parse_report(data: Mapping[str, Any]) -> list[LevelRun]:
    """Every benchmark of a guidellm JSON report, in order."""
    return [_level(benchmark) for benchmark in data["benchmarks"]]


def _level(benchmark: Mapping[str, Any]) -> LevelRun:
    requests = benchmark["requests"]
    ok = requests["successful"]
    errored = requests["errored"]
    served = [*ok, *requests["incomplete"]]
    return LevelRun(
        streams=int(benchmark["config"]["strategy"]["streams"]),
        ttfts_ms=_values(served, "time_to_first_token_ms"),
        itls_ms=_values(served, "inter_token_latency_ms"),
        finished_ttfts_ms=_values(ok, "time_to_first_token_ms"),
        successful=len(ok),
        errored=len(errored),
        incomplete=len(requests["incomplete"]),
        duration_s=float(benchmark["duration"]),
        start=float(benchmark["start_time"]),
        end=float(benchmark["end_time"]),
        output_tokens=sum(int(r.get("output_tokens") or 0) for status in _STATUSES for r in requests[status]),
        first_error=next((str(r["info"]["error"]) for r in errored if r.get("info", {}).get("error")), None),
    )


def _values(requests: list[Mapping[str, Any]], key: str) -> tuple[float, ...]:
    return tuple(float(r[key]) for r in requests if r.get(key) is not None)
