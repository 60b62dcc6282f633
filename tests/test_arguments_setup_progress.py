"""immiscible_pipeline.training (arguments, accelerator_setup, step_bookkeeping, pixel_trainers): the pieces that do not need a training run."""

from immiscible_pipeline.training.accelerator_setup import cpu_thread_advice


def test_cpu_training_with_idle_cores_gets_the_launch_flag_that_uses_them():
    advice = cpu_thread_advice("cpu", threads=1, cores=8, processes=2)
    assert "--num_cpu_threads_per_process 4" in advice and "OMP_NUM_THREADS=4" in advice
    assert cpu_thread_advice("cpu", threads=4, cores=8, processes=2) is None  # already uses its share
    assert cpu_thread_advice("cpu", threads=1, cores=2, processes=2) is None  # one core each: nothing idle
    assert cpu_thread_advice("cuda", threads=1, cores=8, processes=1) is None  # the GPU does the work
