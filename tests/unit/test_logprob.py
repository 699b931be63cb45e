import pytest
import torch

from megatron_gad.kernels.logprob import vocab_parallel_logprob


def _naive(logits, target, vocab_size=None):
    """Full log_softmax in float64 (the reference); padding columns sliced off."""
    x = logits.double()[..., : vocab_size or logits.shape[-1]]
    logp = x.log_softmax(-1)
    lp = logp.gather(-1, target[..., None]).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    return lp, ent


def _case(shape, V, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, V, generator=g) * 3).to(dtype)
    target = torch.randint(0, V, shape, generator=g)
    w_lp, w_ent = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    return logits, target, w_lp, w_ent


@pytest.mark.parametrize("chunk", [1, 3, 7, 1024])
def test_values_and_grads_match_naive(chunk):
    logits, target, w_lp, w_ent = _case((2, 9), 50)  # T=18 not divisible by 7 or 3*...
    a = logits.clone().requires_grad_()
    lp, ent = vocab_parallel_logprob(a, target, chunk_size=chunk, compute_entropy=True)
    ((lp * w_lp).sum() + (ent * w_ent).sum()).backward()
    b = logits.clone().requires_grad_()
    lp0, ent0 = _naive(b, target)
    ((lp0 * w_lp).sum() + (ent0 * w_ent).sum()).backward()
    lp0, ent0, b.grad = lp0.float(), ent0.float(), b.grad.float()
    assert lp.shape == (2, 9) and ent.shape == (2, 9)
    torch.testing.assert_close(lp, lp0, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ent, ent0, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-6)


def test_logprob_only_grad_and_no_entropy():
    logits, target, w_lp, _ = _case((13,), 31, seed=1)
    a = logits.clone().requires_grad_()
    lp, ent = vocab_parallel_logprob(a, target, chunk_size=5)
    assert ent is None
    (lp * w_lp).sum().backward()
    b = logits.clone().requires_grad_()
    (_naive(b, target)[0] * w_lp).sum().backward()
    b.grad = b.grad.float()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-6)
    # gradient rows sum to zero: onehot - softmax
    torch.testing.assert_close(a.grad.sum(-1), torch.zeros(13), atol=1e-6, rtol=0)


def test_padded_vocab_is_masked():
    V, real = 40, 33
    logits, target, w_lp, w_ent = _case((11,), V, seed=2)
    target = target % real
    logits[:, real:] = 50.0  # padding would dominate if not masked
    a = logits.clone().requires_grad_()
    lp, ent = vocab_parallel_logprob(a, target, vocab_size=real, chunk_size=4, compute_entropy=True)
    ((lp * w_lp).sum() + (ent * w_ent).sum()).backward()
    b = logits.clone().requires_grad_()
    lp0, ent0 = _naive(b, target, vocab_size=real)
    ((lp0 * w_lp).sum() + (ent0 * w_ent).sum()).backward()
    lp0, ent0, b.grad = lp0.float(), ent0.float(), b.grad.float()
    torch.testing.assert_close(lp, lp0, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ent, ent0, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-6)
    assert (a.grad[:, real:] == 0).all()


def test_inplace_backward_matches():
    logits, target, w_lp, w_ent = _case((10,), 23, seed=3)
    x = logits.clone().requires_grad_()
    y = x * 1.0  # non-leaf, like the output layer's logits
    lp, ent = vocab_parallel_logprob(y, target, chunk_size=3, compute_entropy=True, inplace_backward=True)
    ((lp * w_lp).sum() + (ent * w_ent).sum()).backward()
    b = logits.clone().requires_grad_()
    lp0, ent0 = _naive(b, target)
    ((lp0 * w_lp).sum() + (ent0 * w_ent).sum()).backward()
    lp0, ent0, b.grad = lp0.float(), ent0.float(), b.grad.float()
    torch.testing.assert_close(x.grad, b.grad, atol=1e-6, rtol=1e-6)


def test_bf16_input_fp32_statistics():
    logits, target, w_lp, _ = _case((6,), 64, seed=4, dtype=torch.bfloat16)
    a = logits.clone().requires_grad_()
    lp, _ = vocab_parallel_logprob(a, target, chunk_size=4)
    assert lp.dtype == torch.float32
    (lp * w_lp).sum().backward()
    assert a.grad.dtype == torch.bfloat16
    torch.testing.assert_close(lp, _naive(logits, target)[0].float(), atol=1e-5, rtol=1e-5)


def test_inplace_backward_on_sliced_output_layer_logits():
    """The actor's training path: logits [B, S, V] = hidden @ W^T, sliced to the response positions
    (non-contiguous), in-place backward. Gradients of W and hidden equal the out-of-place path."""
    g = torch.Generator().manual_seed(5)
    B, S, H, V, P, R = 3, 9, 8, 17, 4, 5
    hidden = torch.randn(B, S, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    target = torch.randint(0, V, (B, R), generator=g)
    grads = []
    for inplace in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        logits = h @ w.t()  # [B, S, V]
        lp, ent = vocab_parallel_logprob(logits[:, P - 1:P - 1 + R], target, chunk_size=4, compute_entropy=True,
                                         inplace_backward=inplace)
        (lp.sum() - 0.1 * ent.sum()).backward()
        grads.append((h.grad, w.grad))
    torch.testing.assert_close(grads[1][0], grads[0][0], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(grads[1][1], grads[0][1], atol=1e-12, rtol=1e-12)
