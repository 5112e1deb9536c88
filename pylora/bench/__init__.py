"""The benchmark suites and the one harness they share (timing, limits, sanity checks, reports).

Run them with `pylora bench [suite]` or `python -m pylora.bench.<module>`; they ship with the package,
so neither needs a source checkout. SUITES maps each suite's command-line name to its module and to
the stem of its JSON file; GROUPS are the names `pylora bench` accepts for several suites at once.
Importing this package imports nothing heavy: each suite module is imported only when it runs.
"""

# name -> (module under pylora.bench, JSON stem, one line on what it measures)
SUITES = {
    "merge": ("merge", "merge", "merge_ / unmerge_ of one weight against addmm_, PEFT's way and careful fp32"),
    "train-layer": ("train_layer", "train_layer", "one LoRA linear's training step against PEFT's and the frozen layer"),
    "train-model": ("train_model", "train_model", "a Llama's LoRA training step against PEFT's and the frozen base"),
    "train-joint": ("train_joint", "train_joint", "many adapters trained in one batch against N sequential PEFT steps"),
    "multi-kernel": ("multi_kernel", "multi_kernel", "lora_apply_ (many adapters, one batch) against PEFT's loop"),
    "multi-model": ("multi_model", "multi_model", "MultiLoRA serving a Llama against PEFT's mixed batch and the base"),
    "merge-checkpoint": ("merge_checkpoint", "merge_checkpoint",
                         "pylora merge on a sharded checkpoint: peak memory and time against load-everything"),
}

GROUPS = {
    "merge": ("merge",),
    "train": ("train-layer", "train-model", "train-joint"),
    "multi": ("multi-kernel", "multi-model"),
    "checkpoint": ("merge-checkpoint",),
    "all": tuple(SUITES),
}
