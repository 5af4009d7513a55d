"""End-to-end check with the official `openai` Python SDK against `vllm-edge demo`.

Starts the demo (three simulated replicas behind the gateway) on free ports, then runs a
non-streaming chat completion, a streaming one, an audio transcription and translation
(multipart uploads) and an unknown-model error through the gateway.
Usage: python openai_sdk.py PATH_TO_VLLM_EDGE_BINARY
"""

import json
import subprocess
import sys
import time

import openai

MODEL = "sim-llama"
# The LoRA adapters `vllm-edge demo` serves (src/demo.rs).
ADAPTERS = ["sql-lora", "chat-lora"]


def start_demo(binary):
    proc = subprocess.Popen(
        [binary, "demo", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--replicas", "3"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    deadline = time.monotonic() + 60
    for line in proc.stdout:
        try:
            event = json.loads(line)
        except ValueError:
            continue  # the human-readable banner
        if event.get("event") == "ready":
            return proc, event["listeners"][0]
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise SystemExit("demo did not become ready")


def check_chat(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say hello"}],
        max_tokens=8,
        extra_body={"ignore_eos": True},  # vLLM's flag: generate exactly max_tokens
    )
    assert r.object == "chat.completion", r
    assert r.choices[0].message.role == "assistant", r
    assert r.choices[0].message.content, r
    assert r.usage.completion_tokens == 8, r.usage


def check_stream(client):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count"}],
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    text, usage, finish = "", None, None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert text, "no streamed text"
    assert finish == "length", finish
    assert usage is not None and usage.completion_tokens == 6, usage


def wav(seconds):
    """A silent 16 kHz 16-bit mono WAV file."""
    import io
    import wave

    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"\0\0" * 16000 * seconds)
    return out.getvalue()


def check_audio(client):
    audio = wav(2)
    r = client.audio.transcriptions.create(model=MODEL, file=("a.wav", audio, "audio/wav"))
    assert r.text, r
    r = client.audio.translations.create(model=MODEL, file=("a.wav", audio, "audio/wav"))
    assert r.text, r


def check_models(client):
    models = {m.id: m for m in client.models.list().data}
    assert sorted(models) == sorted([MODEL] + ADAPTERS), models
    # vLLM's own fields come through (the SDK keeps unknown ones in model_extra).
    extra = models[MODEL].model_extra or {}
    assert extra.get("max_model_len", 0) > 0, extra
    assert "root" in extra and extra.get("parent", "absent") is None, extra
    # A LoRA adapter names its base model.
    for a in ADAPTERS:
        assert (models[a].model_extra or {}).get("parent") == MODEL, models[a]


def check_lora(client):
    # The demo's replicas serve LoRA adapters with one slot each (vLLM's default).
    for a in ADAPTERS:
        r = client.chat.completions.create(
            model=a, messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert r.model == a, r
        assert r.choices[0].message.content, r


def check_unknown_model(client):
    try:
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}]
        )
    except openai.NotFoundError as e:
        assert e.status_code == 404
        assert "no-such-model" in str(e), str(e)
        return
    raise AssertionError("an unknown model must raise NotFoundError")


def main():
    proc, addr = start_demo(sys.argv[1])
    passed = failed = 0
    try:
        client = openai.OpenAI(base_url=f"http://{addr}/v1", api_key="unused", max_retries=0)
        checks = (check_chat, check_stream, check_audio, check_models, check_lora, check_unknown_model)
        for check in checks:
            try:
                check(client)
                passed += 1
                print(f"ok: {check.__name__}")
            except Exception as e:  # report every check, then fail
                failed += 1
                print(f"FAILED: {check.__name__}: {e!r}")
    finally:
        proc.kill()
        proc.wait()
    print(f"openai-sdk: {passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
