"""The bad-input catalogue as a table: RELIABILITY.md from `tests/app/bad_inputs.py`.

Runs every case of the catalogue in this process (the same builders and judge as
`tests/app/test_bad_inputs.py`, known failures included), then writes RELIABILITY.md: one row per
case (kind, first line of the message, names file/option, says fix, leaves nothing behind), the
count "N clear of M", the date and the machine; and ``bench/out/reliability.json`` with the
full outputs. A minute or two on 2 cores. Only the catalogue is rewritten: the marker line
``MARKER`` and everything after it (sections of other bench scripts) are kept.

Usage: ``python bench/reliability.py [--out RELIABILITY.md] [--only KIND ...]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

sys.path.insert(0, str(C.ROOT / "tests" / "app"))
from bad_inputs import CASES, KNOWN_FAILURES, Case, Verdict, build_shared, run_case  # noqa: E402

_MSG_CHARS = 110
# Text below this line of RELIABILITY.md is written by other bench scripts (kills, corruption,
# training faults) and pasted by hand: rewriting the catalogue keeps it.
MARKER = "<!-- sections below are written by other bench scripts -->"
INTRO = """\
Kinds of bad input and faults a careful operator tries before trusting featcache with a week of
GPU time, one row each, run through the real CLI. A case is *clear* when the command ends in a
message, not a traceback (exit code != 0 for an error), the message names the file or option at
fault and says a fix in CLI words, and the folder tree is byte-identical afterwards except for the
output the case expects.

How each column is judged: *names file/option*: the output holds the path at fault (or its
`folder/name`) or the option string; *says fix*: the prose (paths cut out) holds one of the case's
fix keywords, e.g. the option to use, `--overwrite`, `re-run`, `download`; a diagnosis alone
("corrupt", "truncated") is not a fix, but for a missing path "does not exist" is; *leaves
nothing behind*: a snapshot (SHA-256 of every file, and every folder) of the case's folder and of
the shared artefacts is the same after the run, outside the output the case expects. A success
case (exit 0 expected) must say what it is checked for, e.g. the unlabelled tile count.

The cases live in `tests/app/bad_inputs.py` (each builds its input in a fresh folder);
`tests/app/test_bad_inputs.py` runs them as tests (cases that still fail are strict xfails listed
in `KNOWN_FAILURES`); this file is written by `python bench/reliability.py`.
"""


def _short(text: str) -> str:
    """One table cell: the message's first line, shortened, pipes escaped, temp paths cut."""
    text = text.replace("|", "\\|").replace("`", "'")
    return text if len(text) <= _MSG_CHARS else text[: _MSG_CHARS - 1] + "…"


def _mark(ok: bool | None) -> str:
    return "—" if ok is None else ("yes" if ok else "**no**")


def run_all(cases: list[Case], root: Path) -> tuple[list[Verdict | str], float]:
    """Verdicts of CASES (a string where the case was skipped here) and the wall seconds."""
    t0 = time.perf_counter()
    shared = build_shared(root / "shared")
    out: list[Verdict | str] = []
    for case in cases:
        reason = case.skip() if case.skip else None
        if reason:
            out.append(f"skipped: {reason}")
            continue
        verdict = run_case(case, root / case.kind, shared)
        # temporary paths say nothing in the table
        verdict.message = verdict.message.replace(str(root) + "/", "")
        verdict.problems = [p.replace(str(root) + "/", "") for p in verdict.problems]
        out.append(verdict)
        print(f"{'clear' if verdict.clear else 'NOT  '} {case.kind}", flush=True)
    return out, time.perf_counter() - t0


def _row(case: Case, verdict: Verdict | str) -> list[str]:
    if isinstance(verdict, str):
        return [f"`{case.kind}`", case.command, verdict, "—", "—", "—", "—"]
    message = (f"(exit {verdict.exit_code}) " if verdict.crashed else "") + verdict.message
    return [
        f"`{case.kind}`",
        case.command,
        _short(message),
        _mark(verdict.names),
        _mark(verdict.fix),
        _mark(verdict.clean),
        "yes" if verdict.clear else "**no**",
    ]


def render(cases: list[Case], verdicts: list[Verdict | str], seconds: float) -> str:
    """The RELIABILITY.md text."""
    machine = C.machine()
    ran = [(c, v) for c, v in zip(cases, verdicts, strict=True) if isinstance(v, Verdict)]
    clear = sum(v.clear for _, v in ran)
    header = [
        "kind",
        "command",
        "message (first line)",
        "names file/option",
        "says fix",
        "leaves nothing behind",
        "clear",
    ]
    failing = [f"- `{c.kind}`: {'; '.join(v.problems)}" for c, v in ran if not v.clear]
    return "\n".join(
        [
            "# Reliability: the bad-input catalogue",
            "",
            INTRO,
            f"**{clear} clear of {len(ran)}** ({len(cases) - len(ran)} skipped on this machine), "
            f"{machine['date']}, {machine['cpu']}, {machine['cores']} cores, "
            f"GPU: {machine['gpu'] or 'none'}, torch {machine['torch']}, python "
            f"{machine['python']}; {seconds:.0f} s for the whole catalogue.",
            "",
            C.markdown_table(header, [_row(c, v) for c, v in zip(cases, verdicts, strict=True)]),
            "",
            "## Not clear yet",
            "",
            *(failing or ["None."]),
            "",
        ]
    )


def kept_sections(path: Path) -> str:
    """The marker line and everything after it in PATH (the other scripts' sections); the
    marker alone when PATH has none, so that they know where to go."""
    text = path.read_text() if path.is_file() else ""
    at = text.find(MARKER)
    return "\n" + (text[at:] if at >= 0 else MARKER + "\n")


def main(argv: list[str] | None = None) -> None:
    """Run the catalogue and write the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(C.ROOT / "RELIABILITY.md"))
    parser.add_argument("--only", nargs="*", default=None, help="Run only these kinds.")
    args = parser.parse_args(argv)
    cases = [c for c in CASES if not args.only or c.kind in args.only]
    with tempfile.TemporaryDirectory(prefix="featcache-reliability-") as tmp:
        verdicts, seconds = run_all(cases, Path(tmp))
    out = Path(args.out)
    out.write_text(render(cases, verdicts, seconds) + kept_sections(out))
    payload: dict[str, Any] = {
        "seconds": seconds,
        "known_failures": KNOWN_FAILURES,
        "cases": [
            {
                "kind": c.kind,
                "command": c.command,
                **(
                    {"skipped": v}
                    if isinstance(v, str)
                    else {
                        "clear": v.clear,
                        "exit_code": v.exit_code,
                        "message": v.message,
                        "problems": v.problems,
                        "output": v.output[-4000:],
                    }
                ),
            }
            for c, v in zip(cases, verdicts, strict=True)
        ],
    }
    print(f"wrote {args.out} and {C.write_json('reliability', payload)}")


if __name__ == "__main__":
    main()
