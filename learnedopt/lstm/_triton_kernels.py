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


@triton.jit
def load_tile(ptr, rows, n, width, P: tl.constexpr):
    """Rows ``rows`` of a contiguous ``(n, width)`` matrix as a ``(BLOCK, P)`` tile, zero beyond ``width``."""
    cols = tl.arange(0, P)
    return tl.load(ptr + rows[:, None] * width + cols[None, :], mask=(rows[:, None] < n) & (cols[None, :] < width),
                   other=0.0).to(tl.float32)


@triton.jit
def cell_gates(x, h, wx_ptr, wh_ptr, bias_ptr, HP: tl.constexpr):
    """The four gates' activations of a block (weights as in the step kernel, one layer)."""
    i_gate = sigmoid(preactivation(x, h, wx_ptr, wh_ptr, bias_ptr, 0, HP))
    f_gate = sigmoid(preactivation(x, h, wx_ptr, wh_ptr, bias_ptr, 1, HP))
    g_sig = sigmoid(preactivation(x, h, wx_ptr, wh_ptr, bias_ptr, 2, HP))
    o_gate = sigmoid(preactivation(x, h, wx_ptr, wh_ptr, bias_ptr, 3, HP))
    return i_gate, f_gate, g_sig, o_gate


@triton.jit
def cell_forward_kernel(x_ptr, h_ptr, c_ptr, wx_ptr, wh_ptr, bias_ptr, new_h_ptr, new_c_ptr, n, width,
                        H: tl.constexpr, HP: tl.constexpr, BLOCK: tl.constexpr):
    """One LSTM cell on a block of rows: ``c' = f c + i g``, ``h' = o tanh(c')`` (the cell gate pre-scaled by 2)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x, h, c = load_tile(x_ptr, rows, n, width, HP), load_tile(h_ptr, rows, n, H, HP), load_tile(c_ptr, rows, n, H, HP)
    i_gate, f_gate, g_sig, o_gate = cell_gates(x, h, wx_ptr, wh_ptr, bias_ptr, HP)
    c_new = f_gate * c + i_gate * (2.0 * g_sig - 1.0)
    h_new = o_gate * (2.0 * sigmoid(2.0 * c_new) - 1.0)
    cols = tl.arange(0, HP)
    offsets = rows[:, None] * H + cols[None, :]
    mask = (rows[:, None] < n) & (cols[None, :] < H)
    tl.store(new_h_ptr + offsets, h_new, mask=mask)
    tl.store(new_c_ptr + offsets, c_new, mask=mask)


@triton.jit
def cell_backward_kernel(x_ptr, h_ptr, c_ptr, wx_ptr, wh_ptr, bias_ptr, grad_h_ptr, grad_c_ptr, grad_x_ptr,
                         grad_hold_ptr, grad_cold_ptr, grad_wx_ptr, grad_wh_ptr, grad_b_ptr, n, width,
                         H: tl.constexpr, HP: tl.constexpr, BLOCK: tl.constexpr):
    """The cell's backward on a block: gates recomputed in registers, the inputs' and state's gradients written,
    the block's share of the weights' gradients written to its own slot (summed on the host)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    x, h, c = load_tile(x_ptr, rows, n, width, HP), load_tile(h_ptr, rows, n, H, HP), load_tile(c_ptr, rows, n, H, HP)
    grad_h, grad_c = load_tile(grad_h_ptr, rows, n, H, HP), load_tile(grad_c_ptr, rows, n, H, HP)
    i_gate, f_gate, g_sig, o_gate = cell_gates(x, h, wx_ptr, wh_ptr, bias_ptr, HP)
    candidate = 2.0 * g_sig - 1.0
    c_new = f_gate * c + i_gate * candidate
    tanh_c = 2.0 * sigmoid(2.0 * c_new) - 1.0
    grad_c = grad_c + grad_h * o_gate * (1.0 - tanh_c * tanh_c)
    d_i = grad_c * candidate * i_gate * (1.0 - i_gate)
    d_f = grad_c * c * f_gate * (1.0 - f_gate)
    d_g = grad_c * i_gate * 2.0 * g_sig * (1.0 - g_sig)
    d_o = grad_h * tanh_c * o_gate * (1.0 - o_gate)
    cols = tl.arange(0, HP)
    wr, wc = tl.arange(0, HP)[:, None], tl.arange(0, HP)[None, :]
    grad_x = tl.zeros((BLOCK, HP), dtype=tl.float32)
    grad_hold = tl.zeros((BLOCK, HP), dtype=tl.float32)
    for gate in tl.static_range(4):
        if gate == 0:
            d = d_i
        elif gate == 1:
            d = d_f
        elif gate == 2:
            d = d_g
        else:
            d = d_o
        wx = tl.load(wx_ptr + gate * HP * HP + wr * HP + wc)
        wh = tl.load(wh_ptr + gate * HP * HP + wr * HP + wc)
        grad_x += tl.dot(d, tl.trans(wx), input_precision="ieee")
        grad_hold += tl.dot(d, tl.trans(wh), input_precision="ieee")
        slot = (pid * 4 + gate) * HP * HP
        tl.store(grad_wx_ptr + slot + wr * HP + wc, tl.dot(tl.trans(x), d, input_precision="ieee"))
        tl.store(grad_wh_ptr + slot + wr * HP + wc, tl.dot(tl.trans(h), d, input_precision="ieee"))
        tl.store(grad_b_ptr + (pid * 4 + gate) * HP + cols, tl.sum(d, axis=0))
    inside = rows[:, None] < n
    tl.store(grad_x_ptr + rows[:, None] * width + cols[None, :], grad_x, mask=inside & (cols[None, :] < width))
    state = rows[:, None] * H + cols[None, :]
    tl.store(grad_hold_ptr + state, grad_hold, mask=inside & (cols[None, :] < H))
    tl.store(grad_cold_ptr + state, grad_c * f_gate, mask=inside & (cols[None, :] < H))
