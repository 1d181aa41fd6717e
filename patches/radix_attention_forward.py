"""``RadixAttention.forward`` (sglang 0.5.23): record post-RoPE queries into the query ring.

Every model calls its attention layer after RoPE (and after Qwen3's q_norm), so the ``q`` seen here
is what VaSE scores with. Plain tensor writes: captured into the decode CUDA graph.
"""

from sglang_vase.engine.state import device_of

TARGET = "sglang.srt.layers.radix_attention.RadixAttention.forward"
HOOK_TYPE = "BEFORE"


def hook(self, q, k, v, forward_batch, *args, **kwargs):
    device = device_of(self)
    mode = forward_batch.forward_mode
    if device is None or q is None or mode.is_idle():
        return None
    qv = q.reshape(q.shape[0], self.tp_q_head_num, self.qk_head_dim)
    rows = forward_batch.req_pool_indices
    if mode.is_decode():
        device.ring.record_decode(self.layer_id, rows, forward_batch.positions, qv)
    elif mode.is_extend():
        device.ring.record_extend(
            self.layer_id, rows, forward_batch.seq_lens, forward_batch.extend_seq_lens.long(),
            forward_batch.positions, qv,
        )
    return None
