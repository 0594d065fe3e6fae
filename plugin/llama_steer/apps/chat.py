"""``llama-steer chat``: an interactive, steerable chat (history kept across turns).

    llama-steer chat -m model.gguf [--mmproj mm.gguf] [--image strip.png] [steering flags]

Type a message and press Enter. Commands (also while an answer streams: they apply from
the next token on):

    /roi SPEC        retarget (grammar of --roi: panel:4/6, box:..., 50:99, text:"...")
    /mode MODE       bias | shift | redirect | emphasize
    /strength S      logit units
    /focus F         content (image ROIs: only the tokens showing something) | none
    /domain SPEC     for redirect: what to suppress while the ROI is boosted (ROI grammar;
                     image ROIs default to their image), /domain alone clears it
    /off, /on        steering off (strength 0) / back on
    /heads SPEC      all, or L0H3,L2H1
    /image PATH      attach an image to the next message
    /stats           what the last answer's steering did (attention nodes edited)
    /reset           forget the conversation
    /help, /quit
"""

from __future__ import annotations

import argparse
import queue
import sys
import threading

from llama_steer._errors import SteeringError

PROMPT = "> "


class Session:
    """The state of one chat: model, steering, history, pending images."""

    def __init__(self, llm, steering, out=sys.stdout):
        self.llm, self.steering, self.out = llm, steering, out
        self.history: list[dict] = []
        self.images: list[str] = []
        self.saved_strength = steering.strength or 4.0

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def command(self, line: str) -> bool:
        """Apply a /command; False for /quit."""

        name, _, arg = line[1:].strip().partition(" ")
        arg = arg.strip()
        st = self.steering
        try:
            if name in ("quit", "exit"):
                return False
            if name == "help":
                self.say(__doc__.split("Commands", 1)[1].split("\n", 1)[1].rstrip())
            elif name == "roi":
                st.update(roi=arg or None)
                self.say(f"[roi {arg or 'none'}]")
            elif name == "mode":
                st.update(mode=arg)
                self.say(f"[mode {arg}]")
            elif name == "strength":
                st.update(strength=float(arg))
                self.saved_strength = st.strength or self.saved_strength
                self.say(f"[strength {st.strength:g}]")
            elif name == "domain":
                st.update(domain=arg or None)
                self.say(f"[domain {arg or 'none'}]")
            elif name == "focus":
                st.update(focus=arg or "none")
                self.say(f"[focus {arg or 'none'}]")
            elif name == "off":
                if st.strength:
                    self.saved_strength = st.strength
                st.update(strength=0.0)
                self.say("[steering off]")
            elif name == "on":
                st.update(strength=self.saved_strength)
                self.say(f"[steering on, strength {self.saved_strength:g}]")
            elif name == "heads":
                st.update(heads=arg or "all")  # the heads grammar: config.parse_heads
                self.say(f"[heads {arg or 'all'}]")
            elif name == "image":
                from llama_steer.messages import data_uri

                data_uri(arg, "/image")  # a readable image?
                self.images.append(arg)
                self.say(f"[image {arg} goes with the next message]")
            elif name == "stats":
                n = st.stats()
                self.say(
                    f"[{n.n_kq_edited} attention nodes edited, {n.n_rows_edited} rows; {st!r}]"
                )
            elif name == "reset":
                self.history.clear()
                self.say("[conversation cleared]")
            else:
                self.say(f"[unknown command /{name}: /help lists them]")
        except (SteeringError, ValueError) as e:
            self.say(f"[error: {_in_chat_words(e)}]")
        return True

    def turn(self, text: str, inbox: queue.Queue) -> list[str]:
        """Stream one answer; commands arriving meanwhile apply at once, other lines are
        returned to be sent next."""
        from llama_steer.apps.cli import CliError, user_message

        try:
            msg = user_message(text, self.images)
        except CliError as e:
            self.say(f"[error: {e}]")
            return []
        self.images = []
        later: list[str] = []
        reply = []
        try:
            stream = self.llm.create_chat_completion(
                self.history + [msg], max_tokens=self.max_tokens, temperature=0, stream=True
            )
            for chunk in stream:
                piece = chunk["choices"][0]["delta"].get("content", "")
                reply.append(piece)
                print(piece, end="", file=self.out, flush=True)
                while not inbox.empty():
                    line = inbox.get_nowait()
                    # a command typed while the answer streams applies from the next token;
                    # anything queued behind a message keeps its place after that message
                    if line is None or not line.startswith("/") or later:
                        later.append(line)
                    else:
                        print(file=self.out)
                        self.command(line)
        except ValueError as e:  # SteeringError, or llama-cpp-python's (context full, ...)
            from llama_steer.apps.cli import _ctx_error

            err = _ctx_error(e, self) if not isinstance(e, SteeringError) else None
            if err is None and not isinstance(e, SteeringError):
                raise
            self.say(f"\n[error: {err or _in_chat_words(e)}]")
            return later
        print(file=self.out, flush=True)
        self.history += [msg, {"role": "assistant", "content": "".join(reply)}]
        return later

    max_tokens = 128
    ctx_size = 2048
    n_predict = 128


def _in_chat_words(e: Exception) -> str:
    """The library names its Python arguments; here the fix is a chat command."""
    msg = str(e)
    if getattr(e, "field", None) == "domain":
        return (
            "redirect boosts the ROI and suppresses a domain, which a text ROI does not imply: "
            "/domain text:'<all the facts>' first, or /mode bias"
        )
    return msg


def _reader(inbox: queue.Queue) -> None:
    for line in sys.stdin:
        inbox.put(line.rstrip("\n"))
    inbox.put(None)  # end of input


def main(argv: list[str] | None = None) -> int:
    from llama_steer.apps.cli import (
        add_model_args,
        add_steer_args,
        install_warning_format,
        load,
        make_steering,
    )

    install_warning_format()

    p = argparse.ArgumentParser(
        prog="llama-steer chat",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    add_steer_args(p)
    p.add_argument("--image", action="append", default=[], help="image for the first message")
    p.add_argument("-n", "--n-predict", type=int, default=128)
    args = p.parse_args(argv)
    steering, _ = make_steering(args)
    llm, _ = load(args, steering)
    s = Session(llm, steering)
    s.max_tokens = s.n_predict = args.n_predict
    s.ctx_size = args.ctx_size
    s.images = list(args.image)
    inbox: queue.Queue = queue.Queue()
    threading.Thread(target=_reader, args=(inbox,), daemon=True).start()
    s.say("llama-steer chat: type a message, /help for commands, /quit to leave")
    pending: list = []
    try:
        while True:
            print(PROMPT, end="", flush=True)
            line = pending.pop(0) if pending else inbox.get()
            if line is None:
                break
            if not line.strip():
                continue
            if line.startswith("/"):
                if not s.command(line):
                    break
                continue
            pending += s.turn(line, inbox)
    finally:
        llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
