"""The private diffusers internals the low-VRAM engine (app.py section 4b) relies on, checked on the CPU.

A diffusers upgrade that renames or stops calling one of them fails here, in CI, instead of on a user's GPU
(where the engine would silently pin a second copy of the weights, or stream nothing)."""

import inspect

import diffusers
from diffusers.hooks import group_offloading

from studio.engine.stream import PageLockedModuleGroup


def test_module_group_still_builds_its_host_copies_and_pins_through_the_methods_we_override():
    source = inspect.getsource(group_offloading.ModuleGroup)
    for name in ("_init_cpu_param_dict", "_pinned_memory_tensors"):
        assert callable(getattr(group_offloading.ModuleGroup, name)), name
        assert f"self.{name}(" in source, f"ModuleGroup no longer calls {name}: PageLockedModuleGroup overrides nothing"
    # Our overrides replace these and nothing else.
    overridden = {n for n, v in vars(PageLockedModuleGroup).items() if callable(v) or isinstance(v, property)}
    assert overridden == {"_init_cpu_param_dict", "_pinned_memory_tensors"}


def test_module_group_takes_the_arguments_and_has_the_attributes_the_engine_sets():
    parameters = inspect.signature(group_offloading.ModuleGroup.__init__).parameters
    for name in ("modules", "offload_device", "onload_device", "offload_leader", "onload_leader", "non_blocking",
                 "stream", "record_stream", "onload_self", "group_id"):
        assert name in parameters, name
    source = inspect.getsource(group_offloading.ModuleGroup)
    for attribute in ("self.cpu_param_dict", "self.onload_self", "def onload_("):
        assert attribute in source, attribute


def test_group_offloading_hook_still_chains_through_next_group_under_its_registry_name():
    assert group_offloading._GROUP_OFFLOADING == "group_offloading"
    hook_source = inspect.getsource(group_offloading.GroupOffloadingHook)
    assert "self.next_group" in hook_source and "def pre_forward" in hook_source and "def post_forward" in hook_source
    assert "self.group" in hook_source
    config = inspect.signature(group_offloading.GroupOffloadingConfig).parameters
    assert {"onload_device", "offload_device", "offload_type", "non_blocking", "record_stream", "low_cpu_mem_usage",
            "num_blocks_per_group", "stream"} <= set(config)


def test_cache_mixin_keeps_its_config_and_stateful_reset_where_the_engine_and_infer_read_them(demo_pipe):
    transformer = demo_pipe.pipe.transformer
    assert isinstance(transformer, diffusers.models.cache_utils.CacheMixin)
    assert hasattr(transformer, "_cache_config")  # read by enable_budget_offload to put FirstBlockCache back outside
    assert callable(transformer._reset_stateful_cache)  # called by app.run_pipeline after every run
    assert callable(transformer.enable_cache) and callable(transformer.disable_cache)
