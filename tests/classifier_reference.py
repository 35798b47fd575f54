"""A loop reference of ALBEF's classifiers (NLVR2, SNLI-VE, text assignment), written from the
released layout alone: plain tensor operations on a released state dict, one layer at a time, the
way ALBEF's xbert and ViT compute them (post-norm BERT layers with an additive -10000 mask; layer L
of the fusion stack attends image (L - fusion_start) % images; pre-norm ViT blocks). Nothing of
albef_ds is used, so the tests compare our model against ALBEF's arithmetic and key names."""
import math

import torch
import torch.nn.functional as F


def linear(s, p, x):
    return F.linear(x, s[p + ".weight"], s[p + ".bias"])


def layer_norm(s, p, x, eps):
    return F.layer_norm(x, x.shape[-1:], s[p + ".weight"], s[p + ".bias"], eps)


def heads_of(x, heads):
    b, n, width = x.shape
    return x.view(b, n, heads, width // heads).transpose(1, 2)


def merged(x):
    return x.transpose(1, 2).flatten(2)


def vit(s, images, patch, heads, prefix="visual_encoder."):
    """timm's VisionTransformer (ALBEF's ViT): all tokens after the final norm."""
    x = F.conv2d(images, s[prefix + "patch_embed.proj.weight"], s[prefix + "patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([s[prefix + "cls_token"].expand(len(x), -1, -1), x], 1) + s[prefix + "pos_embed"]
    i = 0
    while f"{prefix}blocks.{i}.norm1.weight" in s:
        b = f"{prefix}blocks.{i}."
        q, k, v = linear(s, b + "attn.qkv", layer_norm(s, b + "norm1", x, 1e-6)).chunk(3, -1)
        q, k, v = (heads_of(t, heads) for t in (q, k, v))
        attended = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1) @ v
        x = x + linear(s, b + "attn.proj", merged(attended))
        hidden = F.gelu(linear(s, b + "mlp.fc1", layer_norm(s, b + "norm2", x, 1e-6)))
        x = x + linear(s, b + "mlp.fc2", hidden)
        i += 1
    return layer_norm(s, prefix + "norm", x, 1e-6)


def bert_attention(s, p, x, source, heads, mask, eps):
    q, k, v = (heads_of(linear(s, f"{p}.self.{name}", t), heads)
               for name, t in (("query", x), ("key", source), ("value", source)))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores + (1.0 - mask[:, None, None, :].float()) * -10000.0
    out = merged(scores.softmax(-1) @ v)
    return layer_norm(s, f"{p}.output.LayerNorm", linear(s, f"{p}.output.dense", out) + x, eps)


def bert(s, ids, mask, images, fusion_start, heads, eps=1e-12, prefix="text_encoder."):
    """xbert's BertModel in 'multi_modal' mode: every layer, text and fusion, in one pass; layer L
    >= fusion_start cross-attends images[(L - fusion_start) % len(images)]."""
    e = prefix + "embeddings."
    x = (s[e + "word_embeddings.weight"][ids] + s[e + "position_embeddings.weight"][:ids.shape[1]]
         + s[e + "token_type_embeddings.weight"][0])
    x = layer_norm(s, e + "LayerNorm", x, eps)
    n = 0
    while f"{prefix}encoder.layer.{n}.attention.self.query.weight" in s:
        p = f"{prefix}encoder.layer.{n}."
        x = bert_attention(s, p + "attention", x, x, heads, mask, eps)
        if n >= fusion_start:
            x = bert_attention(s, p + "crossattention", x, images[(n - fusion_start) % len(images)], heads, None, eps)
        x = layer_norm(s, p + "output.LayerNorm",
                       linear(s, p + "output.dense", F.gelu(linear(s, p + "intermediate.dense", x))) + x, eps)
        n += 1
    return x


def logits(s, images, ids, mask, cfg):
    """[B, classes] of a released state dict `s` (cls_head MLP, or ta_head) for texts with one image
    tensor per image slot; `cfg`: our ModelConfig for the patch size, heads and fusion start."""
    with torch.no_grad():
        embeds = [vit(s, image, cfg.vision.patch_size, cfg.vision.heads) for image in images]
        cls = bert(s, ids, mask, embeds, cfg.text.fusion_start, cfg.text.heads, cfg.text.layer_norm_eps)[:, 0]
        if "ta_head.weight" in s:
            return linear(s, "ta_head", cls)
        return linear(s, "cls_head.2", F.relu(linear(s, "cls_head.0", cls)))


def released_shapes(cfg, task: str) -> dict:
    """Key -> shape of ALBEF's released file of `task` (nlvr2, snli_ve, nlvr2_ta) for a model of
    `cfg`'s sizes, spelled out from ALBEF's model classes: timm ViT, xbert BertModel (no `bert.`
    infix, no pooler, position_ids), the head, and the momentum copies (not in the TA file)."""
    v, t = cfg.vision, cfg.text
    grid = (v.img_size // v.patch_size) ** 2
    vision = {"cls_token": (1, 1, v.width), "pos_embed": (1, grid + 1, v.width),
              "patch_embed.proj.weight": (v.width, 3, v.patch_size, v.patch_size), "patch_embed.proj.bias": (v.width,),
              "norm.weight": (v.width,), "norm.bias": (v.width,)}
    hidden = int(v.width * v.mlp_ratio)
    for i in range(v.depth):
        for name, shape in (("norm1", (v.width,)), ("norm2", (v.width,)), ("attn.qkv", (3 * v.width, v.width)),
                            ("attn.proj", (v.width, v.width)), ("mlp.fc1", (hidden, v.width)),
                            ("mlp.fc2", (v.width, hidden))):
            vision[f"blocks.{i}.{name}.weight"] = shape
            vision[f"blocks.{i}.{name}.bias"] = (shape[0],)
    layers = t.layers + (t.layers - t.fusion_start if task != "snli_ve" else 0)
    text = {"embeddings.word_embeddings.weight": (t.vocab_size, t.hidden),
            "embeddings.position_embeddings.weight": (t.max_position, t.hidden),
            "embeddings.token_type_embeddings.weight": (t.type_vocab_size, t.hidden),
            "embeddings.LayerNorm.weight": (t.hidden,), "embeddings.LayerNorm.bias": (t.hidden,),
            "embeddings.position_ids": (1, t.max_position)}
    for n in range(layers):
        blocks = ["attention"] + (["crossattention"] if n >= t.fusion_start else [])
        for block in blocks:
            kv = t.hidden if block == "attention" else v.width
            for name, shape in (("self.query", (t.hidden, t.hidden)), ("self.key", (t.hidden, kv)),
                                ("self.value", (t.hidden, kv)), ("output.dense", (t.hidden, t.hidden)),
                                ("output.LayerNorm", None)):
                text[f"encoder.layer.{n}.{block}.{name}.weight"] = shape or (t.hidden,)
                text[f"encoder.layer.{n}.{block}.{name}.bias"] = (t.hidden,)
        for name, shape in (("intermediate.dense", (t.intermediate, t.hidden)), ("output.dense", (t.hidden, t.intermediate)),
                            ("output.LayerNorm", (t.hidden,))):
            text[f"encoder.layer.{n}.{name}.weight"] = shape
            text[f"encoder.layer.{n}.{name}.bias"] = (shape[0],)
    parts = {"visual_encoder": vision, "text_encoder": text}
    if task == "nlvr2_ta":
        head = {"weight": (3, t.hidden), "bias": (3,)}
        out = {f"ta_head.{k}": s for k, s in head.items()}
        out.update({"vision_proj.weight": (cfg.embed_dim, v.width), "vision_proj.bias": (cfg.embed_dim,),
                    "text_proj.weight": (cfg.embed_dim, t.hidden), "text_proj.bias": (cfg.embed_dim,), "temp": ()})
    else:
        classes = 2 if task == "nlvr2" else 3
        head = {"0.weight": (t.hidden, t.hidden), "0.bias": (t.hidden,), "2.weight": (classes, t.hidden),
                "2.bias": (classes,)}
        parts["cls_head"] = head
        out = {}
    for suffix in ([""] if task == "nlvr2_ta" else ["", "_m"]):
        for part, keys in parts.items():
            out.update({f"{part}{suffix}.{k}": s for k, s in keys.items()})
    return out


def random_release(cfg, task: str, seed: int = 0) -> dict:
    """A released-layout state dict of random weights: norms near 1, position_ids an arange, and in
    NLVR2's doubled fusion layers the key / value of a pair's first layer the same tensors as the
    second's (ALBEF's share_cross_attention: the state dict lists both)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in released_shapes(cfg, task).items():
        if key.endswith("position_ids"):
            state[key] = torch.arange(shape[1])[None]
        elif "norm" in key.lower() and key.endswith("weight"):
            state[key] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            state[key] = 0.1 * torch.randn(shape, generator=g) if shape else torch.tensor(0.07)
    if task != "snli_ve":
        t = cfg.text
        for prefix in ("text_encoder.", "text_encoder_m."):
            for first in range(t.fusion_start, t.layers + t.layers - t.fusion_start, 2):
                for name in ("key.weight", "key.bias", "value.weight", "value.bias"):
                    key = f"{prefix}encoder.layer.{first}.crossattention.self.{name}"
                    if key in state:
                        state[key] = state[key.replace(f"layer.{first}.", f"layer.{first + 1}.")]
    return state
