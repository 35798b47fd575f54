"""The encoders load pretrained weights through timm / transformers and reproduce their outputs."""
import pytest
import timm
import numpy as np
import torch
from timm.layers import resample_abs_pos_embed
from transformers import BertConfig, BertForMaskedLM, BertModel

from albef_ds.config import TextConfig, VisionConfig
from albef_ds.models.bert import BertTextFusion, load_hf_bert
from albef_ds.models.vit import build_vit, resize_pos_embed

HF = dict(vocab_size=120, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
          intermediate_size=64, max_position_embeddings=40, hidden_dropout_prob=0.0,
          attention_probs_dropout_prob=0.0)


def text_cfg(path=None):
    return TextConfig(pretrained=path, vocab_size=120, hidden=32, layers=4, fusion_start=2, heads=4,
                      intermediate=64, max_position=40, hidden_dropout=0.0, attention_dropout=0.0)


@pytest.fixture(scope="module")
def saved_bert(tmp_path_factory):
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("bert")
    BertForMaskedLM(BertConfig(**HF)).save_pretrained(path)
    return str(path)


def text_batch():
    ids = torch.randint(5, 120, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    return ids, mask


def test_text_layers_match_transformers(saved_bert):
    ours = BertTextFusion(text_cfg(), image_width=32).eval()
    missing = load_hf_bert(ours, saved_bert)
    assert missing and all(".crossattention." in k for k in missing)
    hf = BertModel.from_pretrained(saved_bert, attn_implementation="eager").eval()
    ids, mask = text_batch()
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, output_hidden_states=True).hidden_states[2]
        got = ours.encode_text(ids, mask)
    keep = mask.bool()
    assert (got - expected)[keep].abs().max() <= 1e-5


def test_mlm_head_matches_transformers_and_is_tied(saved_bert):
    ours = BertTextFusion(text_cfg(), image_width=32).eval()
    load_hf_bert(ours, saved_bert)
    hf = BertForMaskedLM.from_pretrained(saved_bert).eval()
    h = torch.randn(5, 32)
    with torch.no_grad():
        assert torch.allclose(ours.mlm_logits(h), hf.cls(h), atol=1e-5)
    assert ours.cls.predictions.decoder.weight is ours.bert.embeddings.word_embeddings.weight


def test_fusion_layers_match_transformers_cross_attention_layers():
    torch.manual_seed(2)
    hf_cfg = BertConfig(**HF, is_decoder=True, add_cross_attention=True)
    hf_cfg._attn_implementation = "eager"
    hf = BertModel(hf_cfg, add_pooling_layer=False).eval()
    ours = BertTextFusion(text_cfg(), image_width=32).eval()
    state = {k: v for k, v in hf.state_dict().items()
             if ".crossattention." not in k or int(k.split(".")[2]) >= 2}
    result = ours.bert.load_state_dict(state, strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    ids, mask = text_batch()
    images = torch.randn(3, 9, 32)
    additive = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    with torch.no_grad():
        x = ours.encode_text(ids, mask)
        expected = x
        for layer in hf.encoder.layer[2:]:
            expected = layer(expected, attention_mask=additive, encoder_hidden_states=images)
        got = ours.fuse(x, mask, [images])
    assert (got - expected)[mask.bool()].abs().max() <= 1e-5


def test_fusion_segments_equal_separate_passes():
    ours = BertTextFusion(text_cfg(), image_width=24).eval()
    ids, mask = text_batch()
    a, b = torch.randn(3, 9, 24), torch.randn(3, 9, 24)
    with torch.no_grad():
        x = ours.encode_text(ids, mask)
        joint = ours.fuse(torch.cat([x, x]), torch.cat([mask, mask]), [a, b], [(3, 0), (3, 1)])
        assert torch.allclose(joint[:3], ours.fuse(x, mask, [a]), atol=1e-6)
        assert torch.allclose(joint[3:], ours.fuse(x, mask, [b]), atol=1e-6)


def test_bert_shape_mismatch_is_named(saved_bert):
    cfg = text_cfg()
    cfg.hidden = 64
    with pytest.raises(ValueError, match="hidden_size is 32, config says 64"):
        load_hf_bert(BertTextFusion(cfg, image_width=64), saved_bert)


def vision_cfg(**kw):
    base = dict(timm_name="deit_base_patch16_224", img_size=32, patch_size=8, width=48, depth=2, heads=3)
    base.update(kw)
    return VisionConfig(**base)


def test_vit_loads_timm_weights_file_and_resizes_pos_embed(tmp_path):
    reference = timm.create_model("deit_base_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                  embed_dim=48, depth=2, num_heads=3, num_classes=0).eval()
    path = tmp_path / "deit_tiny.pth"
    torch.save(reference.state_dict(), path)

    ours = build_vit(vision_cfg(pretrained=str(path))).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ours.forward_features(images), reference.forward_features(images), atol=1e-6)
    assert ours.blocks[0].norm1.eps == 1e-6 and ours.blocks[0].attn.qkv.bias is not None

    bigger = build_vit(vision_cfg(pretrained=str(path), img_size=48))
    assert bigger.pos_embed.shape == (1, 1 + 36, 48)
    expected = resample_abs_pos_embed(reference.pos_embed, new_size=(6, 6), num_prefix_tokens=1)
    assert torch.allclose(bigger.pos_embed, expected, atol=1e-5)
    assert torch.allclose(resize_pos_embed(reference.pos_embed.detach(), 48, 8), expected, atol=1e-5)
    assert torch.equal(bigger.pos_embed[:, :1], reference.pos_embed[:, :1])


def test_vit_missing_weights_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        build_vit(vision_cfg(pretrained=str(tmp_path / "nowhere.pth")))


def mae_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """MAE's construction (facebookresearch/mae, util/pos_embed.py), written here as MAE writes it:
    the meshgrid takes w first, so grid[0] (the first half of the channels) is the column."""
    grid_h = np.arange(grid_size, dtype=np.float64)
    grid_w = np.arange(grid_size, dtype=np.float64)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])

    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)


def test_vit_sincos_start_is_maes_table_with_its_halves_swapped_and_weights_replace_it(tmp_path):
    """pos_embed_init sincos: MAE's 2D sin-cos table (its own construction, above) with the row in
    the first half of the channels and the column in the second (MAE: column first); the CLS entry
    is zero; the table is learned (a parameter). A weights file replaces it."""
    import dataclasses

    cfg = VisionConfig(img_size=32, patch_size=8, width=16, depth=1, heads=2, pos_embed_init="sincos")
    vit = build_vit(cfg)
    table = vit.pos_embed.detach()[0]
    assert table.shape == (17, 16) and vit.pos_embed.requires_grad
    mae = torch.from_numpy(mae_2d_sincos_pos_embed(16, 4)).float()
    torch.testing.assert_close(table, torch.cat([mae[:, 8:], mae[:, :8]], 1), rtol=0, atol=1e-6)
    row_2_col_1, row_1_col_2 = table[1 + 4 * 2 + 1], table[1 + 4 * 1 + 2]
    torch.testing.assert_close(row_2_col_1[:8], row_1_col_2[8:], rtol=0, atol=1e-6)   # row first
    timm_start = build_vit(dataclasses.replace(cfg, pos_embed_init="timm"))
    assert timm_start.pos_embed.abs().max() < 0.1
    weights = tmp_path / "vit.pth"
    torch.save({k: torch.full_like(v, 0.5) if k == "pos_embed" else v for k, v in timm_start.state_dict().items()},
               weights)
    loaded = build_vit(dataclasses.replace(cfg, pretrained=str(weights)))
    assert torch.equal(loaded.pos_embed.detach(), torch.full((1, 17, 16), 0.5))
