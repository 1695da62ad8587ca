"""Pipeline parallelism inside one replica: the model's levels cut into stages on their own devices, the
replica's batch flowing through them as micro-batches. The plans are pure (trainer/parallel/); this
package carries them out with TensorFlow.

engine.py   PipelineEngine: each stage's variables on its device; `gradients(batch)` for one replica
step.py     the graph of one step: the schedule's forward and backward ops per stage, and their clocks
devices.py  one device per stage for this process; logical CPU devices; device memory
profile.py  what each level costs (measured time, parameters, activations), for `partition: auto`
setup.py    from the config to a built model and engine (`build_pipeline`), and the report
"""
from trainer.strategy.pipeline.engine import PipelineEngine, split_micro_batches

__all__ = ["PipelineEngine", "split_micro_batches"]
