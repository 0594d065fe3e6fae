"""``llama-steer chat`` driven through a pseudo-terminal, as a person would use it."""

import os
import pty
import select
import subprocess
import sys
import time

import pytest

QUESTION = "John lives in Berlin. Mary lives in Madrid. Where does Mary live?"


class Terminal:
    def __init__(self, args):
        self.master, slave = pty.openpty()
        env = dict(os.environ, OMP_WAIT_POLICY="passive")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llama_steer.apps.cli", *args],
            stdin=slave,
            stdout=slave,
            stderr=subprocess.DEVNULL,
            env=env,
            close_fds=True,
        )
        os.close(slave)
        self.screen = ""
        self.pos = 0  # where the last match ended

    def read_until(self, text: str, timeout: float = 120.0) -> str:
        """Output from the end of the last match up to and including ``text``."""
        start, end = self.pos, time.time() + timeout
        while text not in self.screen[start:]:
            if time.time() > end:
                raise AssertionError(f"no {text!r} within {timeout}s; screen:\n{self.screen}")
            r, _, _ = select.select([self.master], [], [], 0.5)
            if r:
                try:
                    self.screen += os.read(self.master, 4096).decode(errors="replace")
                except OSError:
                    break
        self.pos = self.screen.index(text, start) + len(text)
        return self.screen[start : self.pos]

    def type(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())

    def command(self, line: str, ack: str) -> str:
        self.type(line)
        return self.read_until(ack) + self.read_until("> ")

    def ask(self, line: str) -> str:
        self.type(line)
        return self.read_until("> ")

    def close(self) -> int:
        self.type("/quit")
        rc = self.proc.wait(timeout=60)
        os.close(self.master)
        return rc


@pytest.fixture
def term(gemma_path):
    t = Terminal(
        [
            "chat",
            "-m",
            gemma_path,
            "-n",
            "12",
            "-t",
            "2",
            "--chat-format",
            "gemma",
            "--mode",
            "bias",
        ]
    )
    t.read_until("> ")
    yield t
    if t.proc.poll() is None:
        t.proc.kill()


def edited(term) -> int:
    out = term.command("/stats", "attention nodes edited")
    return int(out.split("[", 1)[1].split()[0])


def test_chat_commands_steer_and_unsteer(term):
    plain = term.ask(QUESTION)
    assert edited(term) == 0
    term.command("/roi text:'Mary lives in Madrid.'", "[roi text:'Mary lives in Madrid.']")
    term.command("/strength -10", "[strength -10]")
    term.command("/reset", "[conversation cleared]")
    steered = term.ask(QUESTION)
    assert edited(term) > 0
    assert steered != plain
    term.command("/off", "[steering off]")
    term.command("/reset", "[conversation cleared]")
    again = term.ask(QUESTION)
    assert edited(term) == 0
    assert again == plain  # steering off gives the unsteered answer back
    assert "[error:" in term.command("/roi panel:9/6", "[error:")
    assert "unknown command" in term.command("/bogus", "unknown command")
    # content focus narrows image targets: with this text ROI it would do nothing, so it is
    # refused (the config stays as it was)
    assert "no image target" in term.command("/focus content", "[error:")
    assert "focus=" not in term.command("/stats", "attention nodes edited")
    assert "is not one of" in term.command("/focus edges", "[error:")
    assert term.close() == 0


def test_retarget_while_streaming(term):
    term.command("/roi text:'Mary lives in Madrid.'", "[roi")
    term.command("/strength -10", "[strength")
    term.command("/heads L0H0", "[heads L0H0]")
    story = "John lives in Berlin. Mary lives in Madrid. Tell me a long story about them."
    term.type(story)
    term.read_until(story + "\r\n")  # the terminal's echo; the answer streams next
    term.type("/off")
    out = term.read_until("> ")
    assert "[steering off]" in out  # applied during the answer, not queued behind it
    assert "strength=0" in term.command("/stats", "attention nodes edited")
    assert term.close() == 0


def test_redirect_in_chat_names_the_domain_command(gemma_path):
    """The library names Python's domain=; in chat the fix is /domain. (Without --mode a
    text ROI gets mode bias, which needs no domain.)"""
    t = Terminal(
        ["chat", "-m", gemma_path, "-n", "4", "-t", "2", "--chat-format", "gemma"]
        + ["--mode", "redirect"]
    )
    try:
        t.read_until("> ")
        out = t.command("/roi text:'Mary lives in Madrid.'", "[error:")
        assert "/domain text:" in out and "domain=" not in out
        t.command("/domain text:'John lives in Berlin. Mary lives in Madrid.'", "[domain")
        assert "[roi text:" in t.command("/roi text:'Mary lives in Madrid.'", "[roi")
        t.ask(QUESTION)
        assert edited(t) > 0
        assert t.close() == 0
    finally:
        if t.proc.poll() is None:
            t.proc.kill()
