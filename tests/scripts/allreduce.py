"""A 2-rank Horovod allreduce: proves Horovod's TensorFlow ops and controller work in this install."""
import horovod.tensorflow as hvd
import tensorflow as tf

hvd.init()
total = hvd.allreduce(tf.constant([float(hvd.rank() + 1)]), op=hvd.Sum)
print(f"rank={hvd.rank()} size={hvd.size()} sum={float(total.numpy()[0])}", flush=True)
