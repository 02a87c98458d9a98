"""The CLI end to end on the embedded default model, with tiny settings."""
import json
import struct
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
from anchor_kernels import generation  # noqa: E402
from anchor_kernels.cli import main  # noqa: E402


def _is_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 100 and height > 100


def test_embedded_model_ships_with_its_provenance():
    model, tokenizer = generation.load_model()
    info = json.loads((generation.DEFAULT_MODEL / "TRAINING.json").read_text())
    assert info["held_out_perplexity"] > 1 and "fortunes" in info["corpus"]
    assert model.config.architectures == ["LlamaForCausalLM"] and len(tokenizer) == model.config.vocab_size


def test_generate_prints_unsteered_and_steered(capsys):
    assert main(["generate", "--prompt", "Life is", "The trouble with people is", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert out.count("unsteered:") == 2 and out.count("steered:") == 4


def test_gap_writes_csv_and_png(tmp_path, capsys):
    csv, png = tmp_path / "gap.csv", tmp_path / "gap.png"
    assert main(["gap", "--prompt", "Life is", "Money can", "--max-new-tokens", "4", "--compare",
                 str(generation.DEFAULT_MODEL), "--csv", str(csv), "--png", str(png)]) == 0
    rows = csv.read_text().splitlines()
    assert rows[0] == "run,prompt,step,gap" and len(rows) == 1 + 3 * 2 * 4
    _is_png(png)


def test_eval_shows_steering_raises_gap_and_sentiment(tmp_path, capsys):
    png = tmp_path / "eval.png"
    assert main(["eval", "--max-new-tokens", "12", "--strengths", "2", "--biases", "1", "--png", str(png)]) == 0
    lines = {line.split()[0] + (" " + line.split()[1] if line.split()[0] != "unsteered" else ""): line.split()
             for line in capsys.readouterr().out.splitlines() if line.strip().startswith(("unsteered", "steer", "logit"))}
    plain, steered = lines["unsteered"], lines["steer eta=2"]
    assert float(steered[-4]) > float(plain[-4])  # anchor gap
    assert float(steered[-3]) > float(plain[-3])  # VADER sentiment
    _is_png(png)


def test_errors_are_clear(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope")]) == 2
    assert "no HF model folder" in capsys.readouterr().err
    assert main(["generate", "--prompts", str(tmp_path / "missing.txt")]) == 2
    assert "--prompts: no such file" in capsys.readouterr().err
    assert main(["generate", "--positive", "good", "--prompt", "x"]) == 2
    assert "both --positive and --negative" in capsys.readouterr().err


def test_console_entry_points():
    out = subprocess.run([sys.executable, "-m", "anchor_kernels", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "generate" in out.stdout and "eval" in out.stdout
