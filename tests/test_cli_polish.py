"""The CLI's manners (issue 24): --help shows defaults, a mistyped flag gets its subcommand's
usage, --prompt-ids refuses empty items, and `semipd stats` is a readable summary with the
server's counters (--json keeps every field)."""

import json
import re
import subprocess
import sys

import pytest

from tests.serving import ROOT, Server

COMMANDS = ["generate", "serve", "api", "complete", "stats", "partition", "chat", "bench"]


def semipd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "semipd", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_the_defaults(command):
    run = semipd(command, "--help")
    assert run.returncode == 0
    text = " ".join(run.stdout.split())  # argparse wraps lines
    expected = {"generate": ["--max-tokens MAX_TOKENS most tokens to generate (default: 16)"],
                "serve": ["(default 256)", "(default 16)", "(default: 60)", "(default: 5.0)"],
                "api": ["(default 8000;"], "complete": ["--timeout SECONDS", "(default: 60)", "(default: 1.0)"],
                "stats": ["(default: 60)"], "partition": ["(default: 180)"], "chat": ["(default: 1.0)"],
                "bench": ["(default: 0)"]}[command]
    assert all(e in text for e in expected), text
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: True)" not in text


def test_a_mistyped_flag_prints_its_subcommands_usage():
    run = semipd("complete", "--promt", "hi")
    assert run.returncode == 2
    assert run.stderr.startswith("usage: semipd complete ") and "--prompt-ids IDS" in run.stderr
    assert run.stderr.rstrip().endswith("semipd complete: error: unrecognized arguments: --promt hi")


@pytest.mark.parametrize("ids", ["1,,2", "1,2,", ",1", "1,x"])
def test_prompt_ids_with_an_empty_or_bad_item_are_refused(ids):
    run = semipd("generate", "--model", "tiny", "--prompt-ids", ids)
    assert run.returncode == 2
    assert f"argument --prompt-ids: expected comma-separated token ids like 1,2,3, got '{ids}'" in run.stderr


@pytest.fixture(scope="module")
def server():
    s = Server("tiny")
    yield s
    assert s.stop() == 0


def test_stats_is_a_readable_summary_with_counters(server):
    for n in (3, 5):
        assert server.client.generate(prompt_ids=[5, 6], max_tokens=n, ignore_eos=True).result()
    data = json.loads(semipd("stats", "--address", server.address, "--json").stdout)
    assert data["model"] == "tiny" and data["uptime_s"] > 0
    assert data["served"] == {"requests": 2, "prompt_tokens": 4, "output_tokens": 8}
    run = semipd("stats", "--address", server.address)
    assert run.returncode == 0 and run.stderr == ""
    lines = run.stdout.splitlines()
    assert lines[0].startswith("model:      tiny, up ")
    assert lines[1] == "mode:       semi-pd, SMs: prefill 60% / decode 100% (static; recorded only: no MPS)"
    assert lines[2] == "requests:   0 running, 0 waiting, 2 ended (4 prompt and 8 output tokens)"
    total = data["kv_pages_total"]
    assert lines[3].startswith(f"KV cache:   0 of {total:,} pages used (0.0%), 16 tokens a page")
    assert lines[4].startswith("prefix:     0 pages cached (0 in use), 0.0% of 4 prompt tokens from the cache")
    assert [line.split()[0] for line in lines[5:]] == ["prefill:", "decode:", "restarts:"]
    assert not re.search(r"None|True|False|\{|\d\.\d{4}", run.stdout)  # no reprs, no 16-digit floats
