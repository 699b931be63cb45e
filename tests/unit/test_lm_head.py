"""lm_head_logprob (hidden states -> log-prob / entropy through the LM head, in vocabulary and token
chunks) against full logits + log_softmax in float64: values and the gradients of the hidden rows
and of the output weight."""

import pytest
import torch

from megatron_gad.kernels.lm_head import hidden_head, lm_head_logprob, output_weight


def _reference(hidden, weight, target, temperature=1.0, vocab_size=None):
    """[N, V] logits in float64, padding rows of the weight sliced off, then log_softmax."""
    w = weight[: vocab_size or weight.shape[0]]
    logp = ((hidden.double() @ w.double().t()) / temperature).log_softmax(-1)
    lp = logp.gather(-1, target[..., None]).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    return lp, ent


def _case(N, H, V, seed=0, real=None):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    target = torch.randint(0, real or V, (N,), generator=g)
    w_lp, w_ent = torch.randn(N, generator=g), torch.randn(N, generator=g)
    return hidden, weight, target, w_lp, w_ent


def _both(hidden, weight, target, w_lp, w_ent, entropy=True, vocab_size=None, temperature=1.0, **kw):
    """(ours, reference): (lp, ent, grad hidden, grad weight), the reference cast to fp32."""
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp, ent = lm_head_logprob(h, w, target, vocab_size=vocab_size, temperature=temperature,
                              compute_entropy=entropy, **kw)
    loss = (lp * w_lp).sum() + ((ent * w_ent).sum() if entropy else 0)
    loss.backward()
    h0, w0 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp0, ent0 = _reference(h0, w0, target, temperature, vocab_size)
    ((lp0 * w_lp).sum() + ((ent0 * w_ent).sum() if entropy else 0)).backward()
    return (lp, ent, h.grad, w.grad), (lp0.float(), ent0.float(), h0.grad.float(), w0.grad.float())


def _close(a, b):
    for x, y in zip(a, b):
        if x is not None:
            torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("token_chunk,vocab_chunk", [(1, 1), (3, 7), (5, 64), (1024, 8192)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_and_grads_match_fp64_logits(token_chunk, vocab_chunk, temperature):
    hidden, weight, target, w_lp, w_ent = _case(17, 12, 50)
    ours, ref = _both(hidden, weight, target, w_lp, w_ent, temperature=temperature,
                      token_chunk=token_chunk, vocab_chunk=vocab_chunk)
    assert ours[0].shape == (17,) and ours[1].shape == (17,)
    _close(ours, ref)


def test_log_prob_only():
    hidden, weight, target, w_lp, _ = _case(13, 8, 31, seed=1)
    ours, ref = _both(hidden, weight, target, w_lp, None, entropy=False, token_chunk=4, vocab_chunk=6)
    assert ours[1] is None
    _close(ours, ref)


def test_padded_vocab_rows_are_excluded():
    V, real = 40, 33
    hidden, weight, target, w_lp, w_ent = _case(11, 8, V, seed=2, real=real)
    weight[real:] = hidden.mean(0) * 20  # padding rows would dominate the softmax if they entered it
    ours, ref = _both(hidden, weight, target, w_lp, w_ent, vocab_size=real, token_chunk=4, vocab_chunk=9)
    _close(ours, ref)  # the reference's padding rows get no gradient either
    assert (ours[3][real:] == 0).all()


def test_leading_shape_and_large_logits():
    """[b, r] rows, and logits far from 0 (the online max rescaling across vocabulary chunks)."""
    hidden, weight, target, *_ = _case(12, 6, 37, seed=3)
    weight[30:] += 3.0  # the max moves late in the vocabulary walk
    h = (hidden * 4).view(3, 4, 6)
    lp, ent = lm_head_logprob(h, weight, target.view(3, 4), vocab_chunk=5, token_chunk=5, compute_entropy=True)
    lp0, ent0 = _reference(h.view(12, 6), weight, target)
    torch.testing.assert_close(lp, lp0.float().view(3, 4), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(ent, ent0.float().view(3, 4), atol=1e-5, rtol=1e-6)


def test_bf16_close_to_fp64():
    hidden, weight, target, w_lp, w_ent = _case(9, 16, 64, seed=4)
    h, w = hidden.bfloat16().requires_grad_(), weight.bfloat16().requires_grad_()
    lp, ent = lm_head_logprob(h, w, target, compute_entropy=True, token_chunk=4, vocab_chunk=16)
    ((lp * w_lp).sum() + (ent * w_ent).sum()).backward()
    assert lp.dtype == torch.float32 and h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    lp0, ent0 = _reference(h.detach(), w.detach(), target)  # the same bf16 inputs, exact math
    torch.testing.assert_close(lp, lp0.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(ent, ent0.float(), atol=2e-2, rtol=2e-2)


def test_bad_temperature_is_an_error():
    hidden, weight, target, *_ = _case(3, 4, 5)
    with pytest.raises(ValueError, match="temperature"):
        lm_head_logprob(hidden, weight, target, temperature=0.0)


def test_hidden_head_passthrough_on_a_linear_head():
    """hidden_head swaps the output layer's forward for the block only; output_weight finds the
    weight (tied: the embedding's)."""

    class Head(torch.nn.Linear):
        sequence_parallel = False

        def forward(self, x, weight=None, runtime_gather_output=None):
            return x @ (self.weight if weight is None else weight).t(), None

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.output_layer = Head(4, 6, bias=False)
            self.embedding = torch.nn.Embedding(6, 4)
            self.share_embeddings_and_output_weights = False

        def shared_embedding_or_output_weight(self):  # GPTModel's: the embedding on a first stage
            return self.embedding.weight

    class Wrapper(torch.nn.Module):  # like DDP: the model as .module
        def __init__(self, m):
            super().__init__()
            self.module = m

    model = Model()
    x = torch.randn(3, 4)
    with hidden_head(Wrapper(model)):
        y, _ = model.output_layer(x)
        assert y is x
    assert model.output_layer(x)[0].shape == (3, 6)
    assert output_weight(Wrapper(model)) is model.output_layer.weight  # untied: the head's own
    model.share_embeddings_and_output_weights = True
    assert output_weight(Wrapper(model)) is model.embedding.weight
