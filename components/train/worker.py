"""What every Ray Train worker runs: a DeepSpeed engine over tim_core's model and objective, the EMA,
checkpoints that Ray tracks, and (on rank 0) MLflow metrics, sample grids and the progress bar.

Checkpoint layout (one Ray checkpoint folder, filled by all ranks):
  latest, step-N/...      DeepSpeed's own files (module, optimizer partitions, scheduler, step counter)
  rng-rank{r}.pt          each rank's objective generator and torch RNG (exact continuation)
  ema.pt, state.json      rank 0: EMA state; step, images seen, identity
  export/                 rank 0, final checkpoint only: EMA weights via tim_core.save_pretrained,
  export/raw/             and the raw (non-EMA) weights the same way (common.layout.RAW_DIR); on latent
                          shards each carries the VAE (vae/), so that a model always decodes with its own
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from components.common.layout import RAW_DIR
from components.train.settings import TrainParams, WorkerConfig

EXPORT_DIR = "export"
STATE_FILE = "state.json"


def deepspeed_config(p: TrainParams) -> dict[str, Any]:
    return {
        "train_batch_size": p.optim.global_batch,
        "train_micro_batch_size_per_gpu": p.micro_batch,
        "gradient_accumulation_steps": p.optim.grad_accum,
        "gradient_clipping": p.optim.grad_clip,
        "zero_optimization": {"stage": p.distributed.zero_stage},
        # fp32 master weights and optimizer everywhere: on GPUs the objective runs the forward under bf16 autocast
        # (objective.params.autocast_dtype in the gpu profile) and its DDE passes in fp32 (docs/method.md), which a
        # bf16 DeepSpeed engine (bf16 weights) would defeat.
        "bf16": {"enabled": False},
        # A plain torch AdamW is passed in (DeepSpeed's fused Adam JIT-compiles for minutes).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }


def _warmup(steps: int) -> Callable[[int], float]:
    return lambda s: min(1.0, (s + 1) / steps) if steps else 1.0


class Window:
    """Sums of this rank's logged figures since the last log step."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.steps, self.seconds = 0, 0.0

    def add(self, logs: dict[str, float]) -> None:
        for key, value in logs.items():
            self.sums[key] += value
            self.counts[key] += 1

    def gather_mean(self) -> dict[str, float]:
        """Mean of every figure over all ranks and window steps (collective: every rank calls it)."""
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (dict(self.sums), dict(self.counts)))
        sums: dict[str, float] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)
        for part_sums, part_counts in parts:
            for key, value in part_sums.items():
                sums[key] += value
                counts[key] += part_counts[key]
        return {key: sums[key] / counts[key] for key in sums}


class Worker:
    def __init__(self, config: WorkerConfig) -> None:
        import deepspeed
        import ray.train
        import ray.train.torch

        import tim_core

        self.p = p = config.params
        self.config = config
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        if self.device.type == "cpu":
            torch.set_num_threads(p.distributed.cpus_per_worker)
        self.zero3 = p.distributed.zero_stage == 3

        torch.manual_seed(p.seed)  # identical initial weights on every rank
        model = tim_core.build_model(**config.model_kwargs)
        if config.init_weights is not None:
            # Warm start (train.init_from): before the EMA copies the weights and DeepSpeed partitions them.
            model.load_state_dict(ray.get(config.init_weights))
        model = model.to(self.device)
        self.transport = tim_core.get_transport(p.transport.name, **p.transport.params)
        objective_params = dict(p.objective.params)
        objective_params.setdefault("null_label", model.num_classes)
        self.objective = tim_core.build_objective(p.objective.name, self.transport, **objective_params)
        # The EMA (fp32, full weights) lives on rank 0 only: it is what gets sampled and exported.
        self.ema = self.sample_model = None
        if self.rank == 0:
            self.ema = tim_core.EMA(model, decay=p.ema.decay, warmup=p.ema.warmup)
            self.sample_model = tim_core.build_model(**model.config).to(self.device).eval()
        self.latent = self._latent_space() if self.rank == 0 else None

        optimizer = torch.optim.AdamW(model.parameters(), lr=p.lr, betas=p.optim.betas,
                                      weight_decay=p.optim.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup(p.optim.warmup_steps))
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler,
            config=deepspeed_config(p), dist_init_required=False)

        self.generator = torch.Generator(device=self.device).manual_seed(p.seed * 65_537 + self.rank)
        self.step, self.images = 0, 0
        self._restore(self._latest_checkpoint(ray.train.get_checkpoint()))

    def _latent_space(self) -> Any:
        """The VAE of latent shards (the stage checked it), for decoding sample grids and for the export."""
        import tim_core
        from components.data.reader import read_index

        spec = read_index(self.config.shard_dir).get("latent")
        return tim_core.LatentSpace.load(self.config.shard_dir, spec).to(self.device) if spec else None

    # --- state --------------------------------------------------------------------------------------------
    def _record(self) -> Any:
        from components.train.lineage import StorageRecord

        return StorageRecord(self.config.storage, f"{self.config.name}.checkpoint.json")

    def _latest_checkpoint(self, from_ray: Any) -> Any:
        """The later of Ray's checkpoint and the one recorded after every rank saved it. Ray records a checkpoint
        in its own state a moment after the report, so a driver killed in between restarts without it; the
        record (written only once every rank's files are stored) still names it. A checkpoint whose save was cut
        short is in neither, and is never loaded."""
        import ray.train

        recorded = self._record().read() if self.config.storage else None
        candidates = [from_ray] if from_ray is not None else []
        if recorded is not None:
            candidates.append(ray.train.Checkpoint(recorded["path"]))
        # step-000000123[-final]: the names sort as the steps do
        return max(candidates, key=lambda c: Path(c.path).name, default=None)

    def _restore(self, checkpoint: Any) -> None:
        if checkpoint is None:
            return
        with checkpoint.as_directory() as directory:
            directory = Path(directory)
            self.engine.load_checkpoint(str(directory))
            rng = torch.load(directory / f"rng-rank{self.rank}.pt", weights_only=True)
            self.generator.set_state(rng["generator"])
            torch.set_rng_state(rng["torch"])
            state = json.loads((directory / STATE_FILE).read_text())
            if self.ema is not None:
                self.ema.load_state_dict(torch.load(directory / "ema.pt", map_location=self.device))
        self.step, self.images = state["step"], state["images"]

    def save(self, metrics: dict[str, float], final: bool) -> None:
        """Every rank writes its part into a local folder; Ray merges them into one tracked checkpoint."""
        import ray.train

        with tempfile.TemporaryDirectory(prefix="tim-ckpt-") as tmp:
            directory = Path(tmp)
            self.engine.save_checkpoint(tmp, tag=f"step-{self.step}")
            torch.save({"generator": self.generator.get_state(), "torch": torch.get_rng_state()},
                       directory / f"rng-rank{self.rank}.pt")
            raw = self.raw_weights() if final else None
            if self.rank == 0:
                torch.save(self.ema.state_dict(), directory / "ema.pt")
                state = {"step": self.step, "images": self.images, "identity": self.config.identity}
                (directory / STATE_FILE).write_text(json.dumps(state))
                if final:
                    self.export(directory / EXPORT_DIR, raw)
            dist.barrier()
            # The final checkpoint (with the export) may fall on a step that was just saved as a periodic one (a
            # time budget ends the run there): a name of its own, so that Ray's pruning of the older never hits it.
            dirname = f"step-{self.step:09d}" + ("-final" if final else "")
            ray.train.report({"step": self.step, **metrics}, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=dirname)
        dist.barrier()  # every rank's files are stored: record the checkpoint as complete
        if self.rank == 0:
            self._record().write({"step": self.step, "path": f"{self.config.storage}/{self.config.name}/{dirname}"})

    def raw_weights(self) -> dict[str, torch.Tensor] | None:
        """The trained (non-EMA) weights, full and in float32, on rank 0 (collective under ZeRO-3)."""
        import deepspeed

        params = list(self.engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=self.zero3):
            if self.rank != 0:
                return None
            return {k: v.detach().float().cpu().clone() for k, v in self.engine.module.state_dict().items()}

    def export(self, directory: Path, raw: dict[str, torch.Tensor]) -> None:
        """EMA weights in ``directory`` (what is sampled and promoted), the raw weights in ``directory/raw``
        so that evaluation can compare the two without reading DeepSpeed's checkpoint format."""
        import tim_core

        lineage = {"step": self.step, "images": self.images, "identity": self.config.identity,
                   "mlflow_run_id": self.config.run_id, "objective": self.p.objective.name}
        self.ema.copy_to(self.sample_model)
        tim_core.save_pretrained(self.sample_model, directory, transport=self.transport, latent=self.latent,
                                 extra={"train": {**lineage, "weights": "ema"}})
        # After the EMA export: save_pretrained replaces its whole target folder.
        tim_core.save_pretrained(self.sample_model, directory / RAW_DIR, transport=self.transport, state_dict=raw,
                                 latent=self.latent, extra={"train": {**lineage, "weights": "raw"}})

    # --- training -----------------------------------------------------------------------------------------
    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from torch.utils.data import DataLoader

        from components.data.reader import ShardDataset

        p = self.p
        exact = p.data.resume == "exact"
        dataset = ShardDataset(self.config.shard_dir, "train", shuffle_buffer=p.data.shuffle_buffer,
                               seed=p.seed if exact else p.seed + self.step, rank=self.rank,
                               world_size=self.world, verify=p.data.verify_in_workers, repeat=True)
        loader = DataLoader(dataset, batch_size=p.micro_batch, num_workers=p.data.loader_workers,
                            drop_last=True, persistent_workers=p.data.loader_workers > 0)
        it = iter(loader)
        if exact:
            # Replay the stream up to where the checkpoint left it, so a resumed run sees the same batches.
            for _ in range(self.step * p.optim.grad_accum):
                next(it)
        for x, y in it:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def update_ema(self) -> None:
        import deepspeed

        # Under ZeRO-3 each rank holds a slice of every parameter: gather (all ranks take part), rank 0 averages.
        params = list(self.engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=self.zero3):
            if self.ema is not None:
                self.ema.update(self.engine.module)

    def should_stop(self, deadline: float | None) -> bool:
        """Rank 0 decides on the time budget and tells the others, so all leave at the same step."""
        flag = torch.zeros(1, device=self.device)
        if self.rank == 0 and deadline is not None and time.time() >= deadline:
            flag += 1
        dist.broadcast(flag, src=0)
        return bool(flag.item())

    def sample_grid(self) -> Any:
        """The EMA's samples at ``sample_steps``, the same noise every time (components.evaluation.grid.nfe_grid)."""
        from components.evaluation.grid import nfe_grid

        p, model = self.p.schedule, self.sample_model
        self.ema.copy_to(model)
        mode = "diffusion" if self.p.objective.name == "fm" else "transition"  # fm never saw r != t
        return nfe_grid(model, self.transport, [p.sample_steps], per_class=p.sample_per_class,
                        cfg_scale=p.sample_cfg_scale, seed=self.p.seed, device=self.device, mode=mode,
                        classes=p.sample_classes, latent=self.latent)

    def run(self) -> None:
        p, engine = self.p, self.engine
        log = RankZeroLog(self.config, start_step=self.step) if self.rank == 0 else None
        window, status = Window(), "FAILED"
        deadline, on_step = self.config.deadline, self.config.on_step
        metrics: dict[str, float] = {}
        try:
            data = self.batches()
            while self.step < p.schedule.max_steps and not self.should_stop(deadline):
                started = time.perf_counter()
                for _ in range(p.optim.grad_accum):
                    x, y = next(data)
                    loss, logs = self.objective(engine, x, y, generator=self.generator)
                    engine.backward(loss)
                    engine.step()
                    window.add({"loss": loss.item(), **logs})
                self.update_ema()
                self.step += 1
                self.images += p.optim.global_batch
                window.steps += 1
                window.seconds += time.perf_counter() - started
                if on_step is not None:
                    on_step(self.rank, self.step)
                last = self.step == p.schedule.max_steps
                if self.step % p.schedule.log_every == 0 or last:
                    metrics = {f"train/{k}": v for k, v in window.gather_mean().items()}
                    metrics["train/grad_norm"] = float(engine.get_global_grad_norm() or math.nan)
                    metrics["train/lr"] = engine.get_lr()[0]
                    metrics["perf/step_time_s"] = window.seconds / window.steps
                    metrics["perf/images_per_s"] = p.optim.global_batch * window.steps / window.seconds
                    window = Window()
                    if log is not None:
                        log.metrics(self.step, metrics)
                if log is not None:
                    log.bar.update(1)
                    if p.schedule.sample_every and self.step % p.schedule.sample_every == 0:
                        log.image(self.sample_grid(), self.step)
                if self.step % p.schedule.checkpoint_every == 0 and not last:
                    self.save(metrics, final=False)
            if log is not None:
                log.image(self.sample_grid(), self.step)
            self.save(metrics, final=True)
            status = "FINISHED"
        finally:
            if log is not None:
                log.close(status)
            engine.destroy()


class RankZeroLog:
    """Rank 0's view: MLflow metrics and images on the driver's run, and a progress bar with rate and ETA."""

    def __init__(self, config: WorkerConfig, start_step: int) -> None:
        import mlflow
        from ray.experimental import tqdm_ray

        p = config.params
        self.mlflow = mlflow
        mlflow.set_tracking_uri(config.tracking_uri)  # this worker process's own setting
        mlflow.start_run(run_id=config.run_id, log_system_metrics=p.mlflow.log_system_metrics)
        # An attempt that died after its last checkpoint had logged steps past it; the resumed attempt repeats
        # those steps, and logs only beyond them, so that every step is in the run once.
        history = mlflow.MlflowClient(config.tracking_uri).get_metric_history(config.run_id, "train/loss")
        self.logged_up_to = max((m.step for m in history), default=0)
        # Counts only this attempt's steps so that rate and ETA stay right after a resume.
        self.bar = tqdm_ray.tqdm(total=p.schedule.max_steps - start_step, desc=f"train from step {start_step}")

    def metrics(self, step: int, metrics: dict[str, float]) -> None:
        if step > self.logged_up_to:
            self.mlflow.log_metrics(metrics, step=step, synchronous=False)
        self.bar.set_description(f"train loss {metrics['train/loss']:.4f} {metrics['perf/images_per_s']:.0f} img/s")

    def image(self, image: Any, step: int) -> None:
        if step > self.logged_up_to:
            self.mlflow.log_image(image, key="samples_ema", step=step)

    def close(self, status: str) -> None:
        self.bar.close()
        self.mlflow.flush_async_logging()
        self.mlflow.end_run(status=status)


def train_loop(config: dict[str, WorkerConfig]) -> None:
    """Ray Train's ``train_loop_per_worker`` (its config: {"worker": WorkerConfig})."""
    import deepspeed.ops

    # DeepSpeed would JIT-compile a shared-memory allreduce (~140 s) on CPU; gloo is enough here.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    Worker(config["worker"]).run()
