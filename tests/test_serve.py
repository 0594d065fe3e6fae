"""``llama-steer serve``: llama-cpp-python's OpenAI-compatible server with steering per request,
on a real uvicorn server on loopback with the embedded VLM (one load for the module)."""

import json
import math
import shutil
import socket
import subprocess
import threading
import time

import pytest

pytest.importorskip("uvicorn", reason='pip install -e ".[test]" brings the server')
httpx = pytest.importorskip("httpx")

from llama_steer import comics  # noqa: E402

QUESTION = "What is in this panel?"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(organism):
    """A real uvicorn server on 127.0.0.1 in this process: the app `llama-steer serve`
    runs, with no -m (the embedded VLM and its headmap)."""
    import uvicorn

    from llama_steer.apps.serve import create_app

    port = _free_port()
    app = create_app(port=port, n_threads=2)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/steer/info", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    else:
        pytest.fail("the server did not start")
    yield url
    srv.should_exit = True
    th.join(30)


def strip(seed, layout="2x3", renderer="numpy"):
    desc = comics.make_strip(seed, layout)
    return desc, comics.data_uri(comics.render(desc, renderer))


def chat_body(uri, steering=None, question=QUESTION, **kw):
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": uri}},
                    {"type": "text", "text": question},
                ],
            }
        ],
        "temperature": 0,
        "max_tokens": kw.pop("max_tokens", 12),
        **kw,
    }
    if steering is not None:
        body["steering"] = steering
    return body


def answer(url, body) -> str:
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def stream(url, body) -> list[dict]:
    chunks = []
    with httpx.stream(
        "POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=120
    ) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    return chunks


def names(a: str, desc, k: int) -> bool:
    return a.strip().rstrip(".").lower() == desc.panels[k - 1].thing.name


def test_no_steering_is_the_plain_model_token_for_token(server, organism):
    """A request without `steering` answers as llama-cpp-python's own server would: the
    plain llama_cpp.Llama with the same settings (greedy), token for token; so does an
    explicit strength 0, and an unsteered request right after a steered one (no leak)."""
    import llama_cpp
    from llama_cpp.llama_chat_format import MTMDChatHandler

    from llama_steer import guarded_load

    prompts = [
        chat_body(strip(s)[1], question="Describe the strip.", max_tokens=24) for s in (3, 4)
    ]
    with guarded_load():
        plain = llama_cpp.Llama(
            model_path=organism[0],
            chat_handler=MTMDChatHandler(clip_model_path=organism[1], verbose=False),
            n_ctx=2048,
            n_threads=2,
            logits_all=True,
            verbose=False,
        )
    try:
        want = [
            plain.create_chat_completion(b["messages"], temperature=0, max_tokens=24)["choices"][0][
                "message"
            ]["content"]
            for b in prompts
        ]
    finally:
        plain.close()
    for b, w in zip(prompts, want, strict=True):
        assert answer(server, b) == w
        assert answer(server, {**b, "steering": {"roi": "panel:3@2x3", "strength": 0}}) == w
        answer(server, {**b, "steering": {"roi": "panel:5@2x3"}})  # steered in between
        assert answer(server, b) == w


def test_steering_answers_about_the_asked_panel(server):
    """The ambiguous question, steered per request to each panel (held-out renderer)."""
    hits = total = 0
    for seed, layout in ((101, "2x3"), (102, "1x6")):
        desc, uri = strip(seed, layout)
        plain = answer(server, chat_body(uri))
        assert names(plain, desc, 1)  # unsteered: panel 1
        for k in range(1, 7):
            roi = f"panel:{k}@2x3" if layout == "2x3" else f"panel:{k}/6"
            hits += names(answer(server, chat_body(uri, {"roi": roi})), desc, k)
            total += 1
    assert hits >= total - 1, f"{hits}/{total}"


def test_the_openai_client_steers_with_extra_body(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server + "/v1", api_key="none")
    desc, uri = strip(7)
    msgs = chat_body(uri)["messages"]
    r = client.chat.completions.create(
        model="x",
        messages=msgs,
        temperature=0,
        max_tokens=12,
        extra_body={"steering": {"roi": "panel:4@2x3"}},
    )
    assert names(r.choices[0].message.content, desc, 4)
    parts, regions = [], []
    for chunk in client.chat.completions.create(
        model="x",
        messages=msgs,
        temperature=0,
        max_tokens=12,
        stream=True,
        extra_body={"steering": {"roi": "panel:5@2x3", "observe": True}},
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
            regions.append((chunk.model_extra or {}).get("steering", {}).get("region"))
    assert names("".join(parts), desc, 5)
    # each token says which panel the steered heads attended to most: the one steered to
    assert regions and regions.count("panel:5@2x3") >= len(regions) - 1, regions
    with pytest.raises(openai.BadRequestError, match="panel 9 does not exist"):
        client.chat.completions.create(
            model="x", messages=msgs, max_tokens=4, extra_body={"steering": {"roi": "panel:9@2x3"}}
        )


def test_streamed_chunks_say_where_the_heads_look_only_when_asked(server):
    desc, uri = strip(8)
    plain = stream(server, chat_body(uri, {"roi": "panel:2@2x3"}))
    assert all("steering" not in c for c in plain)  # not asked: nothing added
    seen = stream(server, chat_body(uri, {"roi": "panel:2@2x3", "observe": True}))
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in seen)
    assert names(text, desc, 2)
    info = [c["steering"] for c in seen if c["choices"][0]["delta"].get("content")]
    assert info and all(set(i["mass"]) == {f"panel:{k}@2x3" for k in range(1, 7)} for i in info)
    assert all(math.isfinite(v) and 0 <= v <= 1 for i in info for v in i["mass"].values())
    assert [i["region"] for i in info].count("panel:2@2x3") >= len(info) - 1
    # a box ROI: the ROI against the rest of the image
    box = stream(server, chat_body(uri, {"roi": "box:0,0,60,60", "observe": True}))
    assert {k for c in box if "steering" in c for k in c["steering"]["mass"]} == {"roi", "rest"}
    # not streamed: the region of every generated token
    r = httpx.post(
        server + "/v1/chat/completions",
        json=chat_body(uri, {"roi": "panel:6@2x3", "observe": True}),
        timeout=60,
    )
    assert r.json()["steering"]["regions"].count("panel:6@2x3") >= 2


def test_a_schedule_switches_panel_mid_answer(server):
    desc, uri = strip(9)
    # after the content-free "a", the colour and shape come from panel 5
    a = answer(server, chat_body(uri, {"schedule": [[0, "panel:2@2x3"], [1, "panel:5@2x3"]]}))
    assert names(a, desc, 5), a
    b = answer(server, chat_body(uri, {"schedule": "0:panel:2@2x3;1:panel:5@2x3"}))
    assert a == b


BAD = [
    ({"roi": "panel:9@2x3"}, "steering.roi", "panel 9 does not exist"),
    ({"roi": "blob:1"}, "steering.roi", "cannot read roi term"),
    ({"roi": "panel:2@2x3", "mode": "sideways"}, "steering.mode", "is not one of"),
    ({"roi": "panel:2@2x3", "strength": "5"}, "steering.strength", "expected a number"),
    ({"roi": "panel:2@2x3", "strength": True}, "steering.strength", "expected a number"),
    ({"roi": "panel:2@2x3", "heads": "L99H0"}, "steering.heads", "layer 99"),
    ({"roi": "panel:2@2x3", "heads": [[0, 99]]}, "steering.heads", "head 99"),
    ({"roi": "box:5000,5000,6000,6000"}, "steering.roi", "outside"),
    ({"roi": "panel:2@2x3", "headmap": "/etc/passwd"}, "steering.headmap", "server files"),
    ({"roi": "saliency:/etc/passwd"}, "steering.roi", "file on the server"),
    ({"roi": "panel:2@2x3", "wobble": 1}, "steering.wobble", "unknown key"),
    ({"schedule": ""}, "steering.schedule", "empty"),
    ({"schedule": [[3, "panel:2@2x3"], [1, "panel:3@2x3"]]}, "steering.schedule", "increase"),
    ({"observe": True}, "steering.observe", "give steering.roi"),
    ("panel:2@2x3", "steering", "JSON object"),
]


@pytest.mark.parametrize("streamed", [False, True])
def test_bad_steering_is_a_400_that_names_the_fix_and_the_server_keeps_serving(server, streamed):
    desc, uri = strip(10)
    for steering, param, words in BAD:
        body = chat_body(uri, steering, stream=streamed, max_tokens=4)
        r = httpx.post(server + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 400, (steering, r.status_code, r.text)
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["param"] == param, (steering, err)
        assert words.lower() in err["message"].lower(), (steering, err["message"])
    # NaN is not JSON, but Python's json (and so the server) reads it
    r = httpx.post(
        server + "/v1/chat/completions",
        timeout=60,
        content=json.dumps(chat_body(uri, {"roi": "panel:2@2x3", "strength": float("nan")})),
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and "finite" in r.json()["error"]["message"]
    # and the next requests work, steered and not
    assert names(answer(server, chat_body(uri, {"roi": "panel:3@2x3"})), desc, 3)
    assert names(answer(server, chat_body(uri)), desc, 1)


@pytest.mark.parametrize("streamed", [False, True])
def test_bad_images_are_400s_steered_or_not(server, streamed):
    """What the plain server answers with a 500 (an undecodable image) or drops (an image
    larger than the context) is a 400 naming the fix, with or without steering."""
    import base64

    junk = "data:image/png;base64," + base64.b64encode(b"not an image").decode()
    huge = comics.data_uri(comics.render(comics.make_strip(1, "2x3")).resize((4000, 4000)))
    for uri, words in ((junk, "could not be decoded"), (huge, "n_ctx")):
        for steering in (None, {"roi": "panel:2@2x3"}):
            body = chat_body(uri, steering, stream=streamed, max_tokens=4)
            r = httpx.post(server + "/v1/chat/completions", json=body, timeout=60)
            assert r.status_code == 400, (words, steering, r.status_code, r.text)
            err = r.json()["error"]
            assert err["param"] == "messages" and words in err["message"], err
    desc, uri = strip(15)
    assert names(answer(server, chat_body(uri, {"roi": "panel:3@2x3"})), desc, 3)


def test_text_completions_take_steering_too(server):
    def complete(prompt, steering=None):
        body = {"prompt": prompt, "max_tokens": 4, "temperature": 0}
        if steering is not None:
            body["steering"] = steering
        return httpx.post(server + "/v1/completions", json=body, timeout=60)

    prompt = "a red circle, then a blue square"
    off = complete(prompt, {"roi": 'text:"blue"', "mode": "bias", "strength": 0})
    plain = complete(prompt)
    assert off.status_code == plain.status_code == 200
    assert off.json()["choices"][0]["text"] == plain.json()["choices"][0]["text"]
    on = complete(prompt, {"roi": 'text:"blue"', "mode": "bias", "strength": -30})
    assert on.status_code == 200
    bad = complete("a red circle", {"roi": 'text:"green"', "mode": "bias", "strength": 3})
    assert bad.status_code == 400 and "green" in bad.json()["error"]["message"]


def test_concurrent_clients_each_get_their_own_steering(server):
    """Interleaved clients with different ROIs, streamed and not, and one that leaves
    mid-stream: every answer is the one its own request asked for."""
    desc, uri = strip(12)
    alone = {k: answer(server, chat_body(uri, {"roi": f"panel:{k}@2x3"})) for k in (2, 4, 6)}
    alone[0] = answer(server, chat_body(uri))
    got, errors = {}, []

    def client(k, streamed):
        try:
            body = chat_body(uri, {"roi": f"panel:{k}@2x3"} if k else None)
            if streamed:
                text = "".join(
                    c["choices"][0]["delta"].get("content") or "" for c in stream(server, body)
                )
            else:
                text = answer(server, body)
            got[(k, streamed)] = text
        except Exception as e:  # reported below
            errors.append(e)

    def leaver():
        try:
            body = chat_body(
                uri,
                {"roi": "panel:3@2x3"},
                question="Describe the strip.",
                stream=True,
                max_tokens=64,
            )
            with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=60) as r:
                for _ in zip(range(2), r.iter_lines(), strict=False):
                    pass  # two lines, then hang up
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=leaver)] + [
        threading.Thread(target=client, args=(k, s)) for s in (False, True) for k in (0, 2, 4, 6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    for (k, _), text in got.items():
        assert text == alone[k], (k, text, alone[k])
    assert len(got) == 8
    assert all(names(alone[k], desc, k) for k in (2, 4, 6)) and names(alone[0], desc, 1)
    # after all that, the plain model again
    assert answer(server, chat_body(uri)) == alone[0]


def test_retarget_a_running_stream(server):
    """The page's hover: a running stream moves to another panel from the next token on.
    min_tokens keeps the narration going (EOS suppressed) so the switch lands mid-stream."""
    desc, uri = strip(13)
    r = httpx.post(server + "/v1/steering/retarget", json={"id": "chatcmpl-nope", "roi": "left"})
    assert r.status_code == 404 and "no stream" in r.json()["error"]["message"]
    r = httpx.post(server + "/v1/steering/retarget", json={"roi": "left"})
    assert r.status_code == 400
    body = chat_body(
        uri,
        {"roi": "panel:1@2x3", "observe": True},
        question="Describe the strip.",
        stream=True,
        max_tokens=150,
        min_tokens=150,
    )
    status, regions, switched = [], [], None
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=120) as s:
        for line in s.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"][0]["delta"].get("content"):
                regions.append(chunk["steering"]["region"])
            if not status:
                bad = httpx.post(
                    server + "/v1/steering/retarget", json={"id": chunk["id"], "roi": "panel:8@2x3"}
                )
                status.append(bad.status_code)
                ok = httpx.post(
                    server + "/v1/steering/retarget", json={"id": chunk["id"], "roi": "panel:4@2x3"}
                )
                status.append(ok.status_code)
                switched = ok.json().get("after_tokens")
    assert status == [400, 200], status
    assert switched is not None and switched < 100
    before, after = regions[: max(switched - 1, 0)], regions[switched + 2 :]
    assert before.count("panel:1@2x3") >= len(before) - 1, before
    assert after.count("panel:4@2x3") >= 0.9 * len(after), after
    # finished: its id is gone
    r = httpx.post(server + "/v1/steering/retarget", json={"id": chunk["id"], "roi": "left"})
    assert r.status_code == 404


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl(server):
    desc, uri = strip(14)
    out = subprocess.run(
        [
            "curl",
            "-s",
            server + "/v1/chat/completions",
            "-H",
            "content-type: application/json",
            "-d",
            json.dumps(chat_body(uri, {"roi": "panel:4@2x3"})),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert names(json.loads(out.stdout)["choices"][0]["message"]["content"], desc, 4)
    page = subprocess.run(["curl", "-s", server + "/"], capture_output=True, text=True)
    assert "<html" in page.stdout.lower()


def test_the_command_line_serves_with_a_named_headmap_and_refuses_bad_files(tmp_path):
    """`llama-steer serve` as a user runs it: --headmap is every request's default (shown by
    /steer/info); a file that is no headmap, or -m that is no GGUF, exits 2 naming it."""
    import os
    import sys
    from pathlib import Path

    env = dict(os.environ, OMP_WAIT_POLICY="passive")
    serve = [sys.executable, "-m", "llama_steer.apps.serve"]
    bad = tmp_path / "not-a-headmap.json"
    bad.write_text('{"hello": 1}')
    for args, words in ((["--headmap", str(bad)], "headmap"), (["-m", str(bad)], "GGUF")):
        r = subprocess.run(serve + args, capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 2 and words in r.stderr, (args, r.returncode, r.stderr[-500:])
    hm = str(Path(__file__).resolve().parents[1] / "headmaps" / "organism.json")
    port = _free_port()
    proc = subprocess.Popen(
        serve + ["--port", str(port), "-t", "1", "--headmap", hm],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        for _ in range(600):
            try:
                info = httpx.get(f"http://127.0.0.1:{port}/steer/info", timeout=2)
                break
            except httpx.HTTPError:
                assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
                time.sleep(0.2)
        assert info.json()["headmap"] == hm
        desc, uri = strip(16)
        assert names(
            answer(f"http://127.0.0.1:{port}", chat_body(uri, {"roi": "panel:5@2x3"})), desc, 5
        )
    finally:
        proc.terminate()
        proc.wait(30)
