"""Fine-tuning's model side, in one process (issue 17): packed sequences attend within their
own conversation; the loss is the mean over the global batch's target tokens; LoRA's
adapters start as a no-op, train alone, and fold into the base weights exactly.

References are independent of the code under test: a conversation run alone, unpacked; a
cross-entropy computed here by F.cross_entropy over gathered logits and averaged by hand;
the merged weight computed here as W + alpha/r B A."""

import pytest
import torch
import torch.nn.functional as F

from megalite.config import MODEL_STYLES, LoRAConfig, ModelConfig
from megalite.model.gpt import GPTModel, segment_mask
from megalite.model.lora import add_lora, is_adapter, lora_update
from megalite.parallel import state
from megalite.parallel.layers import init_parameters
from megalite.parallel.pipeline import forward_backward, global_mean_loss

VOCAB, SEQ, SEED = 96, 24, 7
STYLES = {
    "gpt2": dict(MODEL_STYLES["gpt2"]),  # learned absolute positions
    "llama-gqa": dict(MODEL_STYLES["llama"], num_query_groups=2),  # RoPE, SwiGLU, GQA
}


@pytest.fixture(autouse=True)
def one_process():
    state.initialize(1, 1, device=torch.device("cpu"))
    torch.manual_seed(0)


def build(style, **kw):
    cfg = ModelConfig(**STYLES[style], num_layers=2, hidden_size=32, num_attention_heads=4,
                      seq_length=SEQ, hidden_dropout=0.0, attention_dropout=0.0, **kw)  # fmt: skip
    model = GPTModel(cfg, 128, unpadded_vocab_size=VOCAB)
    init_parameters(model, SEED)
    return model.eval()


def pack(*convs):
    """tokens, position_ids, segment_ids [1, SEQ] of conversations packed back to back,
    padded with token 0 as a segment of its own."""
    tokens, pos, seg = [], [], []
    for i, c in enumerate(convs):
        tokens += c
        pos += list(range(len(c)))
        seg += [i] * len(c)
    pad = SEQ - len(tokens)
    tokens += [0] * pad
    pos += list(range(pad))
    seg += [len(convs)] * pad
    return tuple(torch.tensor([x]) for x in (tokens, pos, seg))


def test_segment_mask_is_block_diagonal_causal():
    m = segment_mask(torch.tensor([[0, 0, 1, 1, 1]]))[0, 0]
    want = torch.tensor(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]
    ).bool()
    assert torch.equal(m, want)


@pytest.mark.parametrize("style", STYLES)
def test_packed_conversation_sees_only_itself(style):
    """A conversation's logits in a pack equal its logits alone (unpacked, from position 0)
    and do not move when the other conversation in its pack changes."""
    model = build(style)
    g = torch.Generator().manual_seed(1)
    a = torch.randint(1, VOCAB, (7,), generator=g).tolist()
    b1 = torch.randint(1, VOCAB, (9,), generator=g).tolist()
    b2 = torch.randint(1, VOCAB, (9,), generator=g).tolist()
    t1, p1, s1 = pack(b1, a)  # a second: its positions restart, its keys exclude b
    t2, p2, s2 = pack(b2, a)
    with torch.no_grad():
        l1 = model.full_logits(t1, position_ids=p1, segment_ids=s1)[0, 9:16]
        l2 = model.full_logits(t2, position_ids=p2, segment_ids=s2)[0, 9:16]
        alone = model.full_logits(torch.tensor([a]))[0]
    assert torch.equal(l1, l2), (l1 - l2).abs().max()
    assert torch.allclose(l1, alone, atol=1e-5, rtol=0), (l1 - alone).abs().max()
    # and the other conversation did change the logits where it is (the test can fail)
    with torch.no_grad():
        o1 = model.full_logits(t1, position_ids=p1, segment_ids=s1)[0, :9]
        o2 = model.full_logits(t2, position_ids=p2, segment_ids=s2)[0, :9]
    assert (o1 - o2).abs().max() > 1e-3


def test_masked_loss_is_the_token_mean_over_the_global_batch():
    """Two micro-batches with 2 and 5 target tokens: the step's loss is the mean over all 7
    (not the mean of the two micro-batch means), computed here by hand."""
    model = build("llama-gqa").train()
    from megalite.training.batches import global_batch

    class Cfg:
        num_microbatches = 2

    g = torch.Generator().manual_seed(3)
    batches = []
    for ones in ([3, 4], [2, 5, 8, 11, 12]):
        tokens, pos, seg = pack(torch.randint(1, VOCAB, (14,), generator=g).tolist())
        labels = torch.randint(1, VOCAB, (1, SEQ), generator=g)
        mask = torch.zeros(1, SEQ)
        mask[0, ones] = 1.0
        batches.append(dict(tokens=tokens, labels=labels, loss_mask=mask, position_ids=pos,
                            segment_ids=seg))  # fmt: skip
    losses = forward_backward([model], global_batch(iter(batches), Cfg), 2, packed=True)
    loss = global_mean_loss(losses)
    per_token = []
    with torch.no_grad():
        for bt in batches:
            logits = model.full_logits(bt["tokens"], position_ids=bt["position_ids"],
                                       segment_ids=bt["segment_ids"])[0, :, :VOCAB]  # fmt: skip
            ce = F.cross_entropy(logits.double(), bt["labels"][0], reduction="none")
            per_token += ce[bt["loss_mask"][0].bool()].tolist()
    assert len(per_token) == 7
    want = sum(per_token) / 7
    assert abs(loss.item() - want) < 1e-5, (loss.item(), want)
    means = [sum(per_token[:2]) / 2, sum(per_token[2:]) / 5]
    assert abs(want - sum(means) / 2) > 1e-3  # a mean of means would fail this test


def lora_model(style="llama-gqa", rank=4, alpha=8.0, targets="qkv,proj,fc1,fc2"):
    model = build(style)
    lo = LoRAConfig(lora_rank=rank, lora_alpha=alpha, lora_target_modules=targets)
    trainable = add_lora([model], lo, SEED)
    return model, lo, trainable


@pytest.mark.parametrize("style", STYLES)
def test_lora_starts_as_the_base_and_only_adapters_train(style):
    base = build(style)
    model, lo, trainable = lora_model(style)
    tokens = torch.randint(0, VOCAB, (2, SEQ))
    with torch.no_grad():
        assert torch.equal(model.full_logits(tokens), base.full_logits(tokens))  # B = 0
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(is_adapter(n) for n in names)
    per_layer = 4 * 2  # 4 targets x (A, B)
    assert len(names) == per_layer * 2
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if is_adapter(n))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for _ in range(2):
        labels = torch.randint(0, VOCAB, (2, SEQ))
        model(tokens, labels).mean().backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        assert changed == is_adapter(n), n
        assert p.grad is None or is_adapter(n)


def test_lora_init_depends_on_seed_and_name_only():
    m1, _, _ = lora_model()
    m2, _, _ = lora_model()
    a = dict(m1.named_parameters())
    for n, p in m2.named_parameters():
        assert torch.equal(a[n], p), n
    qkv = a["layers.0.attention.linear_qkv.lora.a"]
    assert 0 < qkv.abs().max() <= 1 / 32**0.5  # kaiming-uniform bound 1/sqrt(in)
    assert not torch.equal(qkv, a["layers.1.attention.linear_qkv.lora.a"])
    assert a["layers.0.attention.linear_qkv.lora.b"].abs().max() == 0


@pytest.mark.parametrize("style", STYLES)
def test_merged_weights_equal_the_adapted_model(style):
    model, lo, _ = lora_model(style)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".lora.b"):
                p.normal_(0, 0.05)  # a trained B: the update is no longer zero
    tokens = torch.randint(0, VOCAB, (2, SEQ))
    with torch.no_grad():
        adapted = model.full_logits(tokens)
    merged = build(style)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, p in merged.named_parameters():
            prefix = n[: -len("weight")]
            if prefix + "lora.a" in params:
                a, b = params[prefix + "lora.a"], params[prefix + "lora.b"]
                p += b @ a * (8.0 / 4)  # here, independently: W + alpha/r B A
                assert torch.allclose(lora_update(a, b, lo.scaling), b @ a * 2.0)
        got = merged.full_logits(tokens)
    assert torch.allclose(got, adapted, atol=1e-5, rtol=0), (got - adapted).abs().max()
    assert (adapted - build(style).full_logits(tokens)).abs().max() > 1e-3
