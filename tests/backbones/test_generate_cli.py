"""The `python -m gmem_jax.generate` command line."""
import json
import subprocess
import sys

import pytest

from gmem_jax.generate import main
from hf_oracle import hf_greedy, save_gpt2, transformers


@pytest.fixture(scope="module")
def gpt2_with_tokenizer(tmp_path_factory, shared_data):
    """A tiny random GPT-2 with the real GPT-2 vocabulary and tokenizer files."""
    path = tmp_path_factory.mktemp("gpt2_tok")
    model = save_gpt2(path, vocab=50257, eos=50256)
    tok = transformers.GPT2TokenizerFast.from_pretrained(str(shared_data / "tokenizers" / "gpt2"))
    tok.save_pretrained(path)
    return path, model, tok


def test_output_is_transformers_greedy(gpt2_with_tokenizer, capsys, highest_precision):
    path, model, tok = gpt2_with_tokenizer
    assert main(["--model", str(path), "--prompt", "Hello world", "--max-new-tokens", "6", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt_token_ids"] == [15496, 995]
    ref = hf_greedy(model, [15496, 995], 6)
    ref = ref[: ref.index(50256) + 1] if 50256 in ref else ref  # the CLI stops at EOS
    assert out["token_ids"] == ref and out["stopped"] == (50256 in ref)
    assert out["text"] == tok.decode(ref, skip_special_tokens=True)
    # without --json: just the continuation
    assert main(["--model", str(path), "--prompt", "Hello world", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == out["text"] + "\n"


def test_user_errors_are_one_line_with_exit_2(tmp_path, gpt2_dir, capsys):
    assert main(["--model", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model") and err.count("\n") == 1
    # weights but no tokenizer files
    assert main(["--model", str(gpt2_dir[0]), "--prompt", "x"]) == 2
    assert "tokenizer" in capsys.readouterr().err


def test_module_entry_point_exit_status(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "gmem_jax.generate", "--model", str(tmp_path / "missing"),
                           "--prompt", "x"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: model") and proc.stdout == ""
