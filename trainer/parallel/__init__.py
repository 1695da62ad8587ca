"""Pure planning of every parallel dimension (standard library only: no TensorFlow, no pydantic).

layout.py     how one step's global batch and the model split: replicas, stages, micro-batches, accumulation
partition.py  which levels go on which pipeline stage
schedule.py   how micro-batches flow through the stages (GPipe, 1F1B) and a unit-time simulation of it
report.py     the pipeline part of `strata plan`: stages, memory, schedule, bubble, warnings
units.py      how those numbers are written
The strategy layer (trainer/strategy/) carries these plans out on devices.
"""
