"""``ForwardBatch.init_new`` (sglang 0.5.23): decode RoPE positions stay absolute after eviction.

SGLang derives decode positions from the physical length (``seq_lens - 1``); an evicted request's
physical length is smaller than its true position by ``position_offset[row]``. A device-side add,
so the decode step needs no host data and replays in a CUDA graph (the graph copies positions in).
A prefill (a new request, or a retracted one re-prefilled whole) starts its row's offset at zero.
"""

from sglang_vase.engine.state import device_of

TARGET = "sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new"
HOOK_TYPE = "AFTER"


def hook(ret, cls, batch, model_runner, *args, **kwargs):
    device = device_of(model_runner)
    if device is None or ret.req_pool_indices is None or ret.forward_mode.is_idle():
        return
    if ret.forward_mode.is_decode():
        ret.positions = ret.positions + device.position_offset[ret.req_pool_indices]
    elif ret.forward_mode.is_extend():
        device.position_offset[ret.req_pool_indices] = 0
