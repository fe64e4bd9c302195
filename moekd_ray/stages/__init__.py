"""The stages the drivers in recipes/ compose, each a unit a newcomer can read alone. The pipeline's stages, in
order, each with one entry function `<stage>_stage(ctx)` that reuses what an interrupted run finished, writes the
stage's MLflow run and returns plain values:

    context.py          RunContext (what every stage is handed), StageTimer, Finished (what --resume finds made)
    tokenise.py         the tokenizers and every split encoded for the experts and the student
    partition_stage.py  the training functions split into the experts' parts (the strategies are partition.py's)
    experts.py          the experts' training (one Ray Train run each), their tokenizers' making and their logits
    aggregate.py        the router on the experts' outputs, and the soft targets it aggregates
    distill.py          the student, distilled from soft targets (Ray Train + DeepSpeed ZeRO)
    evaluate.py         every model on valid and test, and the final table
    attack.py           the student attacked (with attack.in_pipeline; `moekd attack` runs the same on any model)
    register.py         the student logged and registered in MLflow
    pretrain.py         masked-LM pretraining of an encoder on the training code (Ray Train + DeepSpeed ZeRO)
    search.py           what both searches (tune, search-student) share: the finished run they start from

Stages import components and each other, never a driver.
"""
