"""One stage of a plan: start it (resume, or grow it from the previous stage), train it to its
end or to a signal, save.

- `megagrow.train.loop.train_stage`: the stage (the step loop, saving, signals)
- `megagrow.train.start.start_stage`: its start-up (the stage lock, the data; the engine resumed,
  grown or fresh)
- `megagrow.train.transition.transition`: the previous stage's final checkpoint -> this
  stage's first, grown and resharded shard to shard
- `megagrow.train.step.train_step`: the training step, once (the trainer runs it, `megagrow bench` times it)
- `megagrow.train.log`: the stage's log.jsonl (read back through megagrow.fsutil.read_records)

Run under torchrun or srun, one process per rank:

    torchrun --nproc_per_node=2 -m megagrow.cli train recipes/tiny.yaml --stage 0
"""

from megagrow.train.loop import train_stage
from megagrow.train.transition import transition

__all__ = ["train_stage", "transition"]
