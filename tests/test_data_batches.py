"""The one data layer (hf_align.data): collation and padding, label keys and checks, every data form,
rank sharding, eval mode restored."""

import datasets
import pytest
import torch
from torch.utils.data import DataLoader

from hf_align.data import (
    LABEL_KEYS,
    check_dataset_labels,
    check_labels,
    collate,
    dataset_labels,
    iter_batches,
    split_labels,
)
from hf_align.layers import eval_mode

ROWS = [{"input_ids": list(range(1, 2 + i % 4)), "text": "dropped", "label": i % 3} for i in range(10)]


def test_collate_pads_token_columns_and_keeps_labels():
    batch = collate(ROWS[:4], pad_token_id=7)
    assert batch["input_ids"].tolist() == [[1, 7, 7, 7], [1, 2, 7, 7], [1, 2, 3, 7], [1, 2, 3, 4]]
    assert batch["attention_mask"].tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert batch["label"].tolist() == [0, 1, 2, 0] and "text" not in batch
    with pytest.raises(ValueError, match="cannot batch column 'x'"):
        collate([{"x": [1.0]}, {"x": [1.0, 2.0]}])


def test_labels_one_key_list_and_checks():
    assert LABEL_KEYS == ("labels", "label", "label_ids")
    inputs, y = split_labels({"input_ids": 1, "label": 2, "labels": 3})
    assert y == 3 and inputs == {"input_ids": 1}
    check_labels(torch.tensor([0, 2, -100]), 3)  # -100 is the ignore index
    with pytest.raises(ValueError, match=r"must lie in \[0, 2\].*got 3 \(1 of 3"):
        check_labels([0, 3, 1], 3)
    with pytest.raises(TypeError, match="integer class ids"):
        check_labels([0.5, 1.0], 3)
    with pytest.raises(TypeError, match="dict of model inputs"):
        split_labels([1, 2])
    ds = datasets.Dataset.from_list(ROWS).with_format("torch")
    assert dataset_labels(ds).tolist() == [r["label"] for r in ROWS] == dataset_labels(ROWS).tolist()
    with pytest.raises(ValueError, match="train labels must lie in"):
        check_dataset_labels(ROWS + [{"input_ids": [1], "label": 5}], 3, name="train")
    assert dataset_labels(datasets.Dataset.from_dict({"labels": [[0.1, 0.9]]})) is None  # not class ids


def test_every_data_form_gives_the_same_batches():
    def flat(it):
        return [b["input_ids"][:, :1].tolist() + [int(b["attention_mask"].sum())] for b in it]

    ref, n = iter_batches(ROWS, 4)
    ref = flat(ref)
    assert n == 3 and len(ref) == 3
    forms = [
        datasets.Dataset.from_list(ROWS),
        datasets.Dataset.from_list(ROWS).to_iterable_dataset(),
        (r for r in ROWS),
        DataLoader(ROWS, batch_size=4, collate_fn=collate),
    ]
    for form in forms:
        assert flat(iter_batches(form, 4)[0]) == ref
    one = collate(ROWS[:4])
    assert flat(iter_batches(one, 4)[0]) == ref[:1]  # one ready batch
    with pytest.raises(TypeError, match="single example dict"):
        iter_batches(ROWS[0], 4)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        iter_batches(ROWS, 0)
    with pytest.raises(ValueError, match="empty"):
        iter_batches([], 4)
    from hf_align.data import require_reiterable

    require_reiterable(ROWS, "x")
    with pytest.raises(ValueError, match="x needs a second pass"):
        require_reiterable((r for r in ROWS), "x")


def test_rank_sharding_deals_batches_round_robin(monkeypatch):
    import hf_align.data.batches as data_layer

    seen = []
    for rank in (0, 1):
        monkeypatch.setattr(data_layer, "rank_and_world", lambda rank=rank: (rank, 2))
        it, n = iter_batches(ROWS, 3)
        got = [b["label"].tolist() for b in it]
        assert n == len(got)
        seen.append(got)
    everything, _ = iter_batches(ROWS, 3, shard=False)
    everything = [b["label"].tolist() for b in everything]
    assert seen[0] == everything[0::2] and seen[1] == everything[1::2]


def test_eval_mode_restores_every_modules_flag():
    model = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Sequential(torch.nn.Dropout(0.5)))
    model.train()
    model[1].eval()
    before = [m.training for m in model.modules()]
    with pytest.raises(RuntimeError):
        with eval_mode(model):
            assert not any(m.training for m in model.modules())
            x = torch.ones(1000)
            assert torch.equal(model(x), x)
            raise RuntimeError("inside")
    assert [m.training for m in model.modules()] == before
