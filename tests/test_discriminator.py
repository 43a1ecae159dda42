from __future__ import annotations

import torch

from opdistill.discriminator import last_token_index, load_discriminator, positions_from_mask
from opdistill.rollout import left_pad


def right_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(map(len, rows))
    ids = torch.full((len(rows), length), pad)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def test_index_helpers():
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [1, 3, 3]
    assert positions_from_mask(mask).tolist() == [[0, 1, 1, 1], [0, 0, 0, 1], [0, 1, 2, 3]]


def test_scores_are_the_same_with_left_and_right_padding_and_save_load_round_trips(tiny_model, tmp_path):
    torch.manual_seed(0)
    disc = load_discriminator(str(tiny_model)).eval()
    torch.nn.init.normal_(disc.head.weight)  # a non-trivial head so scores differ per sequence
    rows = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
    with torch.no_grad():
        right = disc(*right_pad(rows, 0))
        left = disc(*left_pad(rows, 0))
        alone = torch.stack([disc(torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long))[0] for r in rows])
    torch.testing.assert_close(right, left, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(right, alone, rtol=1e-5, atol=1e-5)
    assert right.shape == (3,) and len(set(right.tolist())) == 3
    disc.save(tmp_path / "d")
    again = load_discriminator(str(tmp_path / "d")).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(*right_pad(rows, 0)), right)


def test_a_fresh_head_scores_zero_so_the_first_bt_loss_is_log_2(tiny_model):
    disc = load_discriminator(str(tiny_model))
    ids, mask = right_pad([[5, 6, 7]], 0)
    assert disc(ids, mask).item() == 0.0


def test_a_shallow_discriminator_keeps_the_first_layers_and_reloads(tiny_model, tmp_path):
    import pytest

    from opdistill.errors import ModelError

    full = load_discriminator(str(tiny_model))
    shallow = load_discriminator(str(tiny_model), layers=1)
    assert len(full.backbone.layers) == 2 and len(shallow.backbone.layers) == 1
    assert shallow.config.num_hidden_layers == 1
    # the kept layer is the student's first layer, unchanged
    torch.testing.assert_close(shallow.backbone.layers[0].mlp.up_proj.weight, full.backbone.layers[0].mlp.up_proj.weight)
    shallow.save(tmp_path / "d")
    again = load_discriminator(str(tmp_path / "d"))
    assert len(again.backbone.layers) == 1
    ids, mask = right_pad([[5, 6, 7]], 0)
    torch.nn.init.normal_(shallow.head.weight)
    shallow.save(tmp_path / "d2")
    with torch.no_grad():
        torch.testing.assert_close(load_discriminator(str(tmp_path / "d2"))(ids, mask), shallow(ids, mask))
    with pytest.raises(ModelError, match="has 2 layers"):
        load_discriminator(str(tiny_model), layers=5)
