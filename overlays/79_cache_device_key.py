"""cache-device-key: the KV cache finds each layer's GPU under the key the device map uses (v0.4.1+).

``StaticCache`` (``models/custom_cache.py``) places layer ``idx``'s KV cache (and, for MLA, its
page table) on ``device[f"blk.{idx}.self_attn"]["generate_device"]`` when local_chat and the
``ktransformers`` server backend hand it ``gguf_loader.tensor_device_map``. That map is filled by
``optimize.inject`` under each rule's ``key``, and from v0.4.1 on ``gen_optimize_config`` makes the
key the module name (``model.layers.0.self_attn``) except on Ascend NPUs, where it is still the
GGUF name (``blk.0.self_attn``; the NPU port changed it, upstream commit bd0ae78d). So on CUDA
every DeepSeek-V2/V3 cache construction raises ``KeyError: 'blk.0.self_attn'`` before the first
token: local_chat and the server cannot generate. Found by the v0.7.0 GPU proof (bench/gpu_run.sh
v0.7.0: ``StaticCache(..., device=model.gguf_loader.tensor_device_map)`` as local_chat calls it).

The edit looks the layer up under the module name first and falls back to the GGUF name, so the
NPU path (and any map built the old way) keeps working, and a multi-GPU rule file still puts each
layer's cache on that layer's GPU.
"""

from ktlegacy.core.overlay import Overlay

CACHE = "ktransformers/models/custom_cache.py"
OLD = 'device[f"blk.{idx}.self_attn"]["generate_device"]'
NEW = ('(device.get(f"model.layers.{idx}.self_attn") or device[f"blk.{idx}.self_attn"])["generate_device"]'
       '  # ktlegacy: module-name keys (v0.4.1+ off NPU)')
KEY_BY_MODULE_NAME = '"key": module_name if not use_torch_npu else translated_name'


class CacheDeviceKeyOverlay(Overlay):
    name = "cache-device-key"
    summary = "StaticCache finds each layer's device under the device map's module-name key (KeyError 'blk.0.self_attn' on CUDA)"
    not_applicable = {ref: "gen_optimize_config keys the device map by GGUF name (blk.N.self_attn), as the cache looks it up"
                      for ref in ("0.2.1.post1", "v0.2.4post1", "v0.3.1", "v0.3.2")}

    def apply(self, tree, ctx):
        optimize = tree.read("ktransformers/optimize/optimize.py")
        if optimize.count(KEY_BY_MODULE_NAME) != 2:
            raise tree.drift("ktransformers/optimize/optimize.py",
                             "gen_optimize_config keying the device map by module name off NPU (2 places)")
        tree.replace(CACHE, OLD, NEW, count=2,
                     what="KV cache and page table device looked up under model.layers.N.self_attn, then blk.N.self_attn")


OVERLAY = CacheDeviceKeyOverlay()
