# mypy: ignore-errors
"""The Triton source of :class:`~learnedopt.lstm.triton_step.TritonStep` (decorated at import: the module is
imported, or reloaded, by ``triton_step._kernel_function`` in the mode ``TRITON_INTERPRET`` asks for)."""

import triton
import triton.language as tl

INTERPRETED = bool(triton.knobs.runtime.interpret)


@triton.jit
def sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))

@triton.jit
def lerp(start, end, weight):
    # torch.lerp's two formulas (the same rounding as the torch ops)
    return tl.where(weight < 0.5, start + weight * (end - start), end - (end - start) * (1.0 - weight))

@triton.jit
def preactivation(x, h, wx_ptr, wh_ptr, bias_ptr, base, HP: tl.constexpr):
    """One gate's ``[x, h] @ W + b`` for a block of rows (``x`` and ``h`` both ``(BLOCK, HP)``)."""
    rows, cols = tl.arange(0, HP)[:, None], tl.arange(0, HP)[None, :]
    wx = tl.load(wx_ptr + base * HP * HP + rows * HP + cols)
    wh = tl.load(wh_ptr + base * HP * HP + rows * HP + cols)
    b = tl.load(bias_ptr + base * HP + tl.arange(0, HP))
    return tl.dot(x, wx, input_precision="ieee") + tl.dot(h, wh, input_precision="ieee") + b[None, :]

@triton.jit
def head_output(h, head_ptr, o, H: tl.constexpr, HP: tl.constexpr):
    """The head's output ``o``; non-finite (a net's NaN weights) counts as zero."""
    hidden = tl.arange(0, HP)
    w = tl.load(head_ptr + o * (HP + 1) + hidden, mask=hidden < H, other=0.0)
    raw = tl.sum(h * w[None, :], axis=1) + tl.load(head_ptr + o * (HP + 1) + HP)
    return tl.where(raw - raw == 0.0, raw, 0.0)

@triton.jit
def step_kernel(
    grad, h_ptr, c_ptr, m_ptr, v_ptr, update, wx_ptr, wh_ptr, bias_ptr, head_ptr, scalars, skipped, n, limit,
    H: tl.constexpr, HP: tl.constexpr, LAYERS: tl.constexpr, NK: tl.constexpr, PAPER: tl.constexpr,
    ADAM: tl.constexpr, BLOCK: tl.constexpr,
):
    # scalars[] as in lstm_kernel.c (learnedopt/_kernel/abi.py): beta2, bias2, output scale, log range, p,
    # threshold, exp(p), decays[8], bias1[8]
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = rows < n
    g = tl.load(grad + rows, mask=inside, other=0.0).to(tl.float32)
    valid = tl.abs(g) <= limit  # false for NaN, +-Inf and gradients whose square overflows
    g = tl.where(valid, g, 0.0)
    hidden = tl.arange(0, HP)
    x = tl.zeros((BLOCK, HP), dtype=tl.float32)  # the features in the first columns
    if PAPER:
        threshold = tl.load(scalars + 5)
        magnitude = tl.abs(g)
        large = magnitude >= threshold
        first = tl.where(large, tl.log(tl.maximum(magnitude, threshold)) / tl.load(scalars + 4), -1.0)
        sign = tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, 0.0))
        second = tl.where(large, sign, g * tl.load(scalars + 6))
        x = tl.where(hidden[None, :] == 0, first[:, None], x)
        x = tl.where(hidden[None, :] == 1, second[:, None], x)
    if (not PAPER) or ADAM:
        v_old = tl.load(v_ptr + rows, mask=inside, other=0.0)
        v_new = tl.where(valid, lerp(g * g, v_old, tl.load(scalars + 0)), v_old)
        tl.store(v_ptr + rows, v_new, mask=inside)
        scale = 1.0 / (tl.sqrt(v_new / tl.load(scalars + 1)) + 1e-8)
        seen = v_new > 0.0
        nominal = tl.zeros((BLOCK,), dtype=tl.float32)
        for k in tl.static_range(NK):
            m_old = tl.load(m_ptr + k * n + rows, mask=inside, other=0.0)
            m_new = tl.where(valid, lerp(g, m_old, tl.load(scalars + 7 + k)), m_old)
            tl.store(m_ptr + k * n + rows, m_new, mask=inside)
            normed = m_new / tl.load(scalars + 15 + k) * scale
            if k == 0:
                nominal = normed
            if not PAPER:
                x = tl.where(hidden[None, :] == 1 + k, normed[:, None], x)
        if not PAPER:
            x = tl.where(hidden[None, :] == 0, (g * scale)[:, None], x)
    state_mask = inside[:, None] & (hidden[None, :] < H)
    write_mask = state_mask & valid[:, None]  # a skipped coordinate keeps its state
    for layer in tl.static_range(LAYERS):
        offsets = layer * n * H + rows[:, None] * H + hidden[None, :]
        h = tl.load(h_ptr + offsets, mask=state_mask, other=0.0).to(tl.float32)
        c = tl.load(c_ptr + offsets, mask=state_mask, other=0.0).to(tl.float32)
        i_gate = sigmoid(preactivation(x, h, wx_ptr, wh_ptr, bias_ptr, layer * 4 + 0, HP))
        f_gate = sigmoid(preactivation(x, h, wx_ptr, wh_ptr, bias_ptr, layer * 4 + 1, HP))
        candidate = 2.0 * sigmoid(preactivation(x, h, wx_ptr, wh_ptr, bias_ptr, layer * 4 + 2, HP)) - 1.0
        o_gate = sigmoid(preactivation(x, h, wx_ptr, wh_ptr, bias_ptr, layer * 4 + 3, HP))
        c_new = f_gate * c + i_gate * candidate  # the cell gate's weights come scaled by 2: its tanh
        x = o_gate * (2.0 * sigmoid(2.0 * c_new) - 1.0)  # the new h: the next layer's input
        tl.store(h_ptr + offsets, x.to(h_ptr.dtype.element_ty), mask=write_mask)
        tl.store(c_ptr + offsets, c_new.to(c_ptr.dtype.element_ty), mask=write_mask)
    raw0 = head_output(x, head_ptr, 0, H, HP)
    if ADAM:
        raw1 = head_output(x, head_ptr, 1, H, HP)
        magnitude = tl.exp(tl.load(scalars + 3) * (2.0 * sigmoid(2.0 * raw0) - 1.0))
        clipped = tl.minimum(tl.maximum(nominal, -1.0), 1.0)
        step = magnitude * clipped - (2.0 * sigmoid(2.0 * raw1) - 1.0)
        u = tl.where(seen, step * -tl.load(scalars + 2), 0.0)
    else:
        u = raw0 * tl.load(scalars + 2)
    tl.store(update + rows, tl.where(valid, u, 0.0), mask=inside)
    tl.atomic_add(skipped, tl.sum((inside & (~valid)).to(tl.int32), axis=0))
