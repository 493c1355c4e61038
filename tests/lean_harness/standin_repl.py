"""Stand-in Lean REPL for the test harness. It is NOT Lean.

Speaks the Lean REPL protocol on stdin/stdout as the Kimina Lean Server drives it (SPEC 11): each command is one
JSON object followed by a blank line; each answer is one JSON value (indented, no blank line inside) followed by
a blank line. Answers come from `kimina_jax.reward.standin_verifier.standin_answer` (recorded real Lean messages
for recorded codes, else simple rules), so the local stand-in verifier and this REPL cannot drift apart.

Tests steer it with comment lines in the snippet (Lean ignores comments, so these pass through the server):
  -- standin: sleep SECONDS   answer after a pause
  -- standin: sleep-once SECONDS   pause only the first time this exact text is seen (state as for crash-once)
  -- standin: crash           exit without answering
  -- standin: crash-once      crash the first time this exact text is seen (state in $KIMINA_STANDIN_STATE_DIR)
  -- standin: garbage         answer with text that is not JSON
  -- standin: repl-error-once answer with a REPL-level error (`{"message": ...}`) the first time this text is seen
Environment: KIMINA_STANDIN_VERDICTS (recorded-verdicts jsonl files, os.pathsep-separated).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import select
import sys
from pathlib import Path

from kimina_jax.reward.standin_verifier import TIMES_OUT, load_recorded, standin_answer

_DIRECTIVE_RE = re.compile(r"^\s*-- standin: (\S+)(?: (\S+))?\s*$", re.MULTILINE)
_TIMEOUT_SLEEP_S = 3600.0  # "Lean runs forever": the server's timeout kills us first


def _commands(stream):
    """Yield each command's text: the lines up to a blank line."""
    lines: list[str] = []
    for line in stream:
        if line.strip():
            lines.append(line)
        elif lines:
            yield "".join(lines)
            lines = []


def _sleep_unless_orphaned(seconds: float) -> None:
    """Sleep, but exit at once if stdin closes (the server died: do not linger as an orphan)."""
    readable, _, _ = select.select([sys.stdin], [], [], seconds)
    if readable:
        sys.exit(0)


def _answer(text: str) -> None:
    sys.stdout.write(text + "\n\n")
    sys.stdout.flush()


def _first_time(text: str) -> bool:
    marker = Path(os.environ["KIMINA_STANDIN_STATE_DIR"]) / hashlib.sha256(text.encode()).hexdigest()
    if marker.exists():
        return False
    marker.touch()
    return True


def main() -> None:
    paths = [p for p in os.environ.get("KIMINA_STANDIN_VERDICTS", "").split(os.pathsep) if p]
    recorded = load_recorded(paths)
    env = 0
    for command in _commands(sys.stdin):
        try:
            text = json.loads(command)["cmd"]
        except (ValueError, KeyError, TypeError) as exc:
            _answer(json.dumps({"message": f"stand-in REPL: could not parse the command ({exc})"}))
            continue
        for action, argument in _DIRECTIVE_RE.findall(text):
            if action == "sleep" or (action == "sleep-once" and _first_time(text)):
                _sleep_unless_orphaned(float(argument))
            elif action == "crash" or (action == "crash-once" and _first_time(text)):
                os._exit(1)
        actions = {action for action, _ in _DIRECTIVE_RE.findall(text)}
        if "garbage" in actions:
            _answer("stand-in REPL garbage: this is not JSON")
            continue
        if "repl-error-once" in actions and _first_time(text):
            _answer(json.dumps({"message": "stand-in REPL: a one-off REPL-level error"}))
            continue
        answer = standin_answer(text, recorded)
        if answer is TIMES_OUT:
            _sleep_unless_orphaned(_TIMEOUT_SLEEP_S)
            continue
        _answer(json.dumps({"env": env, **answer}, ensure_ascii=False, indent=2))
        env += 1


if __name__ == "__main__":
    main()
