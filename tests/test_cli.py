"""The hf-align command: layer views of tiny family models and of saved local folders."""

from tiny_models import tiny_model

from hf_align.cli import main


def test_layers_family(capsys):
    assert main(["layers", "llama"]) == 0
    out = capsys.readouterr().out
    assert "family='llama'" in out and "num_layers=4" in out and "self-check" in out


def test_layers_local_folder(tmp_path, capsys):
    tiny_model("deberta-v2", "DebertaV2ForSequenceClassification").save_pretrained(tmp_path)
    assert main(["layers", str(tmp_path)]) == 0
    assert "DebertaV2ForSequenceClassification" in capsys.readouterr().out
