"""The help of `multimodal train` and `demo`, as Lightning's parser prints it at 80 columns,
kept here so that --help answers without importing torch (`multimodal.cli.train.write_help`
writes it; tests/test_hostile_training.py checks it against the parser)."""

HELP = """\
usage: multimodal train [-c CONFIG] [--seed_everything SEED_EVERYTHING]
                        [--trainer CONFIG] [--trainer.accelerator ACCELERATOR]
                        [--trainer.strategy STRATEGY]
                        [--trainer.devices DEVICES]
                        [--trainer.num_nodes NUM_NODES]
                        [--trainer.precision PRECISION]
                        [--trainer.logger LOGGER]
                        [--trainer.callbacks CALLBACKS]
                        [--trainer.fast_dev_run FAST_DEV_RUN]
                        [--trainer.max_epochs MAX_EPOCHS]
                        [--trainer.min_epochs MIN_EPOCHS]
                        [--trainer.max_steps MAX_STEPS]
                        [--trainer.min_steps MIN_STEPS]
                        [--trainer.max_time MAX_TIME]
                        [--trainer.limit_train_batches LIMIT_TRAIN_BATCHES]
                        [--trainer.limit_val_batches LIMIT_VAL_BATCHES]
                        [--trainer.limit_test_batches LIMIT_TEST_BATCHES]
                        [--trainer.limit_predict_batches LIMIT_PREDICT_BATCHES]
                        [--trainer.overfit_batches OVERFIT_BATCHES]
                        [--trainer.val_check_interval VAL_CHECK_INTERVAL]
                        [--trainer.check_val_every_n_epoch CHECK_VAL_EVERY_N_EPOCH]
                        [--trainer.num_sanity_val_steps NUM_SANITY_VAL_STEPS]
                        [--trainer.log_every_n_steps LOG_EVERY_N_STEPS]
                        [--trainer.enable_checkpointing {true,false,null}]
                        [--trainer.enable_progress_bar {true,false,null}]
                        [--trainer.enable_model_summary {true,false,null}]
                        [--trainer.accumulate_grad_batches ACCUMULATE_GRAD_BATCHES]
                        [--trainer.gradient_clip_val GRADIENT_CLIP_VAL]
                        [--trainer.gradient_clip_algorithm GRADIENT_CLIP_ALGORITHM]
                        [--trainer.deterministic DETERMINISTIC]
                        [--trainer.benchmark {true,false,null}]
                        [--trainer.inference_mode {true,false}]
                        [--trainer.use_distributed_sampler {true,false}]
                        [--trainer.profiler PROFILER]
                        [--trainer.detect_anomaly {true,false}]
                        [--trainer.barebones {true,false}]
                        [--trainer.plugins PLUGINS]
                        [--trainer.sync_batchnorm {true,false}]
                        [--trainer.reload_dataloaders_every_n_epochs RELOAD_DATALOADERS_EVERY_N_EPOCHS]
                        [--trainer.default_root_dir DEFAULT_ROOT_DIR]
                        [--trainer.enable_autolog_hparams {true,false}]
                        [--trainer.model_registry MODEL_REGISTRY]
                        [--model CONFIG] [--model.model_name MODEL_NAME]
                        [--model.lr LR] [--model.weight_decay WEIGHT_DECAY]
                        [--model.betas [ITEM,...]] [--model.eps EPS]
                        [--model.warmup_steps WARMUP_STEPS]
                        [--model.min_lr_ratio MIN_LR_RATIO]
                        [--model.val_loss_batch_size VAL_LOSS_BATCH_SIZE]
                        [--model.loss {clip,siglip,coca}]
                        [--model.caption_loss_weight CAPTION_LOSS_WEIGHT]
                        [--model.micro_batches MICRO_BATCHES]
                        [--model.pretrained PRETRAINED]
                        [--model.cache_dir CACHE_DIR]
                        [--model.lock_image {true,false}]
                        [--model.lock_image_unlocked_groups LOCK_IMAGE_UNLOCKED_GROUPS]
                        [--model.lock_text {true,false}]
                        [--model.lock_text_unlocked_layers LOCK_TEXT_UNLOCKED_LAYERS]
                        [--model.grad_checkpointing {true,false}]
                        [--model.patch_dropout PATCH_DROPOUT]
                        [--model.compile {true,false}]
                        [--model.count_flops {true,false}]
                        [--model.peak_tflops PEAK_TFLOPS]
                        [--model.max_nonfinite_steps MAX_NONFINITE_STEPS]
                        [--data CONFIG] --data.train_shards TRAIN_SHARDS
                        [--data.val_shards VAL_SHARDS]
                        [--data.batch_size BATCH_SIZE]
                        [--data.num_workers NUM_WORKERS]
                        [--data.shuffle_buffer SHUFFLE_BUFFER]
                        [--data.resampled {true,false}]
                        [--data.num_samples NUM_SAMPLES]
                        [--data.train_weights TRAIN_WEIGHTS]
                        [--data.upsampling_factors UPSAMPLING_FACTORS]
                        [--data.image_key IMAGE_KEY]
                        [--data.text_key TEXT_KEY]
                        [--data.caption_field CAPTION_FIELD]
                        [--data.seed SEED] [--data.synthetic SYNTHETIC]
                        [--data.max_bad_fraction MAX_BAD_FRACTION]
                        [--data.max_image_pixels MAX_IMAGE_PIXELS]
                        [--data.decode {auto,cpu,gpu}] [--resume RESUME]
                        [--overwrite {true,false}]

Train a CLIP model on webdataset shards.

options:
  -h, --help            Show this help message and exit.
  -c CONFIG, --config CONFIG
                        Path to a configuration file in json or yaml format.
  --print_config [=flags]
                        Print the configuration after applying all other
                        arguments and exit. The optional flags customizes the
                        output and are one or more keywords separated by
                        comma. The supported flags are: skip_default,
                        skip_unset.
  --seed_everything SEED_EVERYTHING
                        Set to an int to run seed_everything with this value
                        before classes instantiation.Set to True to use a
                        random seed. (type: Union[bool, int], default: 0)
  --resume RESUME       Continue a run: its folder (runs/NAME/version_N: its
                        last.ckpt, logging on in that folder) or a checkpoint
                        file; or auto: the newest run of this config with a
                        checkpoint, else a new run (the same line every time,
                        as a requeued job runs it). Mid-epoch, the data stream
                        continues where it stopped. (type: str | null,
                        default: null)
  --overwrite {true,false}
                        Allow a run to write into an existing, non-empty run
                        folder given by a logger's version (never needed with
                        --resume, nor with the default: a new version_N).
                        (type: bool, default: False)

Customize every aspect of training via flags:
  --trainer CONFIG      Path to a configuration file.
  --trainer.accelerator.help [CLASS_PATH_OR_NAME]
                        Show the help for the given subclass of Accelerator
                        and exit.
  --trainer.accelerator ACCELERATOR
                        Supports passing different accelerator types ("cpu",
                        "gpu", "tpu", "hpu", "mps", "auto") as well as custom
                        accelerator instances. (type: Union[str, Accelerator],
                        default: auto, known subclasses:
                        pytorch_lightning.accelerators.CPUAccelerator,
                        pytorch_lightning.accelerators.CUDAAccelerator,
                        pytorch_lightning.accelerators.MPSAccelerator,
                        pytorch_lightning.accelerators.XLAAccelerator)
  --trainer.strategy.help [CLASS_PATH_OR_NAME]
                        Show the help for the given subclass of Strategy and
                        exit.
  --trainer.strategy STRATEGY
                        Supports different training strategies with aliases as
                        well custom strategies. Default: ``"auto"``. (type:
                        Union[str, Strategy], default: auto, known subclasses:
                        pytorch_lightning.strategies.DDPStrategy,
                        pytorch_lightning.strategies.DeepSpeedStrategy,
                        pytorch_lightning.strategies.XLAStrategy,
                        pytorch_lightning.strategies.FSDPStrategy,
                        pytorch_lightning.strategies.ModelParallelStrategy,
                        pytorch_lightning.strategies.SingleDeviceStrategy,
                        pytorch_lightning.strategies.SingleDeviceXLAStrategy)
  --trainer.devices DEVICES, --trainer.devices+ DEVICES
                        The devices to use. Can be set to a positive number
                        (int or str), a sequence of device indices (list or
                        str), the value ``-1`` to indicate all available
                        devices should be used, or ``"auto"`` for automatic
                        selection based on the chosen accelerator. Default:
                        ``"auto"``. (type: Union[list[int], str, int],
                        default: auto)
  --trainer.num_nodes NUM_NODES
                        Number of GPU nodes for distributed training. Default:
                        ``1``. (type: int, default: 1)
  --trainer.precision PRECISION
                        Double precision (64, '64' or '64-true'), full
                        precision (32, '32' or '32-true'), 16bit mixed
                        precision (16, '16', '16-mixed') or bfloat16 mixed
                        precision ('bf16', 'bf16-mixed'). Can be used on CPU,
                        GPU, TPUs, or HPUs. Default: ``'32-true'``. (type:
                        Union[Literal[64, 32, 16], Literal['transformer-
                        engine', 'transformer-engine-float16', '16-true',
                        '16-mixed', 'bf16-true', 'bf16-mixed', '32-true',
                        '64-true'], Literal['64', '32', '16', 'bf16'], null],
                        default: null)
  --trainer.logger.help CLASS_PATH_OR_NAME
                        Show the help for the given subclass of Logger and
                        exit.
  --trainer.logger LOGGER, --trainer.logger+ LOGGER
                        Logger (or iterable collection of loggers) for
                        experiment tracking. A ``True`` value uses the default
                        ``TensorBoardLogger`` if it is installed, otherwise
                        ``CSVLogger``. ``False`` will disable logging. If
                        multiple loggers are provided, local files
                        (checkpoints, profiler traces, etc.) are saved in the
                        ``log_dir`` of the first logger. Default: ``True``.
                        (type: Union[Logger, Iterable[Logger], bool, null],
                        default: null, known subclasses:
                        pytorch_lightning.loggers.logger.DummyLogger,
                        pytorch_lightning.loggers.CometLogger,
                        pytorch_lightning.loggers.CSVLogger,
                        pytorch_lightning.loggers.MLFlowLogger,
                        pytorch_lightning.loggers.TensorBoardLogger,
                        pytorch_lightning.loggers.WandbLogger)
  --trainer.callbacks.help CLASS_PATH_OR_NAME
                        Show the help for the given subclass of Callback and
                        exit.
  --trainer.callbacks CALLBACKS, --trainer.callbacks+ CALLBACKS
                        Add a callback or list of callbacks. Default:
                        ``None``. (type: Union[list[Callback], Callback,
                        null], default: null, known subclasses:
                        pytorch_lightning.Callback,
                        pytorch_lightning.callbacks.BatchSizeFinder,
                        pytorch_lightning.callbacks.Checkpoint,
                        pytorch_lightning.callbacks.ModelCheckpoint,
                        multimodal.checkpoint.RunCheckpoint,
                        pytorch_lightning.callbacks.OnExceptionCheckpoint,
                        multimodal.preemption.Preemption,
                        pytorch_lightning.callbacks.DeviceStatsMonitor,
                        pytorch_lightning.callbacks.EarlyStopping,
                        pytorch_lightning.callbacks.BaseFinetuning,
                        pytorch_lightning.callbacks.BackboneFinetuning, pytorc
                        h_lightning.callbacks.GradientAccumulationScheduler,
                        pytorch_lightning.callbacks.LambdaCallback,
                        pytorch_lightning.callbacks.LearningRateFinder,
                        pytorch_lightning.callbacks.LearningRateMonitor,
                        pytorch_lightning.callbacks.ModelSummary,
                        pytorch_lightning.callbacks.RichModelSummary,
                        pytorch_lightning.callbacks.BasePredictionWriter,
                        pytorch_lightning.callbacks.ProgressBar,
                        pytorch_lightning.callbacks.RichProgressBar,
                        pytorch_lightning.callbacks.TQDMProgressBar,
                        multimodal.monitor.RunProgressBar,
                        pytorch_lightning.callbacks.Timer,
                        pytorch_lightning.callbacks.ModelPruning,
                        pytorch_lightning.callbacks.SpikeDetection,
                        pytorch_lightning.callbacks.StochasticWeightAveraging,
                        pytorch_lightning.callbacks.ThroughputMonitor,
                        pytorch_lightning.callbacks.WeightAveraging,
                        pytorch_lightning.callbacks.EMAWeightAveraging,
                        pytorch_lightning.cli.SaveConfigCallback,
                        multimodal.cli.train.SaveAndLogConfig,
                        multimodal.checkpoint.FinalCheckpoint,
                        multimodal.checkpoint.ExactResume,
                        multimodal.monitor.Throughput,
                        multimodal.monitor.TrainingHealth,
                        multimodal.monitor.SourceShares)
  --trainer.fast_dev_run FAST_DEV_RUN
                        Runs n if set to ``n`` (int) else 1 if set to ``True``
                        batch(es) of train, val and test to find any bugs (ie:
                        a sort of unit test). Default: ``False``. (type:
                        Union[int, bool], default: False)
  --trainer.max_epochs MAX_EPOCHS
                        Stop training once this number of epochs is reached.
                        Disabled by default (None). If both max_epochs and
                        max_steps are not specified, defaults to ``max_epochs
                        = 1000``. To enable infinite training, set
                        ``max_epochs = -1``. (type: Optional[int], default:
                        null)
  --trainer.min_epochs MIN_EPOCHS
                        Force training for at least these many epochs.
                        Disabled by default (None). (type: Optional[int],
                        default: null)
  --trainer.max_steps MAX_STEPS
                        Stop training after this number of steps. Disabled by
                        default (-1). If ``max_steps = -1`` and ``max_epochs =
                        None``, will default to ``max_epochs = 1000``. To
                        enable infinite training, set ``max_epochs`` to
                        ``-1``. (type: int, default: -1)
  --trainer.min_steps MIN_STEPS
                        Force training for at least these number of steps.
                        Disabled by default (``None``). (type: Optional[int],
                        default: null)
  --trainer.max_time MAX_TIME
                        Stop training after this amount of time has passed.
                        Disabled by default (``None``). The time duration can
                        be specified in the format DD:HH:MM:SS (days, hours,
                        minutes seconds), as a :class:`datetime.timedelta`, or
                        a dictionary with keys that will be passed to
                        :class:`datetime.timedelta`. (type: Union[str,
                        timedelta, dict[str, int], null], default: null)
  --trainer.limit_train_batches LIMIT_TRAIN_BATCHES
                        How much of training dataset to check (float =
                        fraction, int = num_batches). Value is per device.
                        Default: ``1.0``. (type: Union[int, float, null],
                        default: null)
  --trainer.limit_val_batches LIMIT_VAL_BATCHES
                        How much of validation dataset to check (float =
                        fraction, int = num_batches). Value is per device.
                        Default: ``1.0``. (type: Union[int, float, null],
                        default: null)
  --trainer.limit_test_batches LIMIT_TEST_BATCHES
                        How much of test dataset to check (float = fraction,
                        int = num_batches). Value is per device. Default:
                        ``1.0``. (type: Union[int, float, null], default:
                        null)
  --trainer.limit_predict_batches LIMIT_PREDICT_BATCHES
                        How much of prediction dataset to check (float =
                        fraction, int = num_batches). Value is per device.
                        Default: ``1.0``. (type: Union[int, float, null],
                        default: null)
  --trainer.overfit_batches OVERFIT_BATCHES
                        Overfit a fraction of training/validation data (float)
                        or a set number of batches (int). Default: ``0.0``.
                        (type: Union[int, float], default: 0.0)
  --trainer.val_check_interval VAL_CHECK_INTERVAL
                        How often to check the validation set. Pass a
                        ``float`` in the range [0.0, 1.0] to check after a
                        fraction of the training epoch. Pass an ``int`` to
                        check after a fixed number of training batches. An
                        ``int`` value can only be higher than the number of
                        training batches when
                        ``check_val_every_n_epoch=None``, which validates
                        after every ``N`` training batches across epochs or
                        during iteration-based training. Additionally, accepts
                        a time-based duration as a string "DD:HH:MM:SS", a
                        :class:`datetime.timedelta`, or a dict of kwargs to
                        :class:`datetime.timedelta`. When time-based,
                        validation triggers once the elapsed wall-clock time
                        since the last validation exceeds the interval; the
                        check occurs after the current batch completes, the
                        validation loop runs, and the timer is reset. Default:
                        ``1.0``. (type: Union[int, float, str, timedelta,
                        dict[str, int], null], default: null)
  --trainer.check_val_every_n_epoch CHECK_VAL_EVERY_N_EPOCH
                        Perform a validation loop after every `N` training
                        epochs. If ``None``, validation will be done solely
                        based on the number of training batches, requiring
                        ``val_check_interval`` to be an integer value. When
                        used together with a time-based ``val_check_interval``
                        and ``check_val_every_n_epoch`` > 1, validation is
                        aligned to epoch multiples: if the interval elapses
                        before the next multiple-N epoch, validation runs at
                        the start of that epoch (after the first batch) and
                        the timer resets; if it elapses during a multiple-N
                        epoch, validation runs after the current batch. For
                        ``None`` or ``1`` cases, the time-based behavior of
                        ``val_check_interval`` applies without additional
                        alignment. Default: ``1``. (type: Optional[int],
                        default: 1)
  --trainer.num_sanity_val_steps NUM_SANITY_VAL_STEPS
                        Sanity check runs n validation batches before starting
                        the training routine. Set it to `-1` to run all
                        batches in all validation dataloaders. Default: ``2``.
                        (type: Optional[int], default: null)
  --trainer.log_every_n_steps LOG_EVERY_N_STEPS
                        How often to log within steps. Default: ``50``. (type:
                        Optional[int], default: null)
  --trainer.enable_checkpointing {true,false,null}
                        If ``True``, enable checkpointing. It will configure a
                        default ModelCheckpoint callback if there is no user-
                        defined ModelCheckpoint in :paramref:`~pytorch_lightni
                        ng.trainer.trainer.Trainer.callbacks`. Default:
                        ``True``. (type: Optional[bool], default: null)
  --trainer.enable_progress_bar {true,false,null}
                        Whether to enable to progress bar by default. Default:
                        ``True``. (type: Optional[bool], default: null)
  --trainer.enable_model_summary {true,false,null}
                        Whether to enable model summarization by default.
                        Default: ``True``. (type: Optional[bool], default:
                        null)
  --trainer.accumulate_grad_batches ACCUMULATE_GRAD_BATCHES
                        Accumulates gradients over k batches before stepping
                        the optimizer. Default: 1. (type: int, default: 1)
  --trainer.gradient_clip_val GRADIENT_CLIP_VAL
                        The value at which to clip gradients. Passing
                        ``gradient_clip_val=None`` disables gradient clipping.
                        If using Automatic Mixed Precision (AMP), the
                        gradients will be unscaled before. Default: ``None``.
                        (type: Union[int, float, null], default: null)
  --trainer.gradient_clip_algorithm GRADIENT_CLIP_ALGORITHM
                        The gradient clipping algorithm to use. Pass
                        ``gradient_clip_algorithm="value"`` to clip by value,
                        and ``gradient_clip_algorithm="norm"`` to clip by
                        norm. By default it will be set to ``"norm"``. (type:
                        Optional[str], default: null)
  --trainer.deterministic DETERMINISTIC
                        If ``True``, sets whether PyTorch operations must use
                        deterministic algorithms. Set to ``"warn"`` to use
                        deterministic algorithms whenever possible, throwing
                        warnings on operations that don't support
                        deterministic mode. If not set, defaults to ``False``.
                        Default: ``None``. (type: Union[bool, Literal['warn'],
                        null], default: null)
  --trainer.benchmark {true,false,null}
                        The value (``True`` or ``False``) to set
                        ``torch.backends.cudnn.benchmark`` to. The value for
                        ``torch.backends.cudnn.benchmark`` set in the current
                        session will be used (``False`` if not manually set).
                        If :paramref:`~pytorch_lightning.trainer.trainer.Train
                        er.deterministic` is set to ``True``, this will
                        default to ``False``. Override to manually set a
                        different value. Default: ``None``. (type:
                        Optional[bool], default: null)
  --trainer.inference_mode {true,false}
                        Whether to use :func:`torch.inference_mode` or
                        :func:`torch.no_grad` during evaluation
                        (``validate``/``test``/``predict``). (type: bool,
                        default: True)
  --trainer.use_distributed_sampler {true,false}
                        Whether to wrap the DataLoader's sampler with
                        :class:`torch.utils.data.DistributedSampler`. If not
                        specified this is toggled automatically for strategies
                        that require it. By default, it will add
                        ``shuffle=True`` for the train sampler and
                        ``shuffle=False`` for validation/test/predict
                        samplers. If you want to disable this logic, you can
                        pass ``False`` and add your own distributed sampler in
                        the dataloader hooks. If ``True`` and a distributed
                        sampler was already added, Lightning will not replace
                        the existing one. For iterable-style datasets, we
                        don't do this automatically. (type: bool, default:
                        True)
  --trainer.profiler.help [CLASS_PATH_OR_NAME]
                        Show the help for the given subclass of Profiler and
                        exit.
  --trainer.profiler PROFILER
                        To profile individual steps during training and assist
                        in identifying bottlenecks. Default: ``None``. (type:
                        Union[Profiler, str, null], default: null, known
                        subclasses:
                        pytorch_lightning.profilers.AdvancedProfiler,
                        pytorch_lightning.profilers.PassThroughProfiler,
                        pytorch_lightning.profilers.PyTorchProfiler,
                        pytorch_lightning.profilers.SimpleProfiler,
                        pytorch_lightning.profilers.XLAProfiler)
  --trainer.detect_anomaly {true,false}
                        Enable anomaly detection for the autograd engine.
                        Default: ``False``. (type: bool, default: False)
  --trainer.barebones {true,false}
                        Whether to run in "barebones mode", where all features
                        that may impact raw speed are disabled. This is meant
                        for analyzing the Trainer overhead and is discouraged
                        during regular training runs. The following features
                        are deactivated: :paramref:`~pytorch_lightning.trainer
                        .trainer.Trainer.enable_checkpointing`, :paramref:`~py
                        torch_lightning.trainer.trainer.Trainer.logger`, :para
                        mref:`~pytorch_lightning.trainer.trainer.Trainer.enabl
                        e_progress_bar`, :paramref:`~pytorch_lightning.trainer
                        .trainer.Trainer.log_every_n_steps`, :paramref:`~pytor
                        ch_lightning.trainer.trainer.Trainer.enable_model_summ
                        ary`, :paramref:`~pytorch_lightning.trainer.trainer.Tr
                        ainer.num_sanity_val_steps`, :paramref:`~pytorch_light
                        ning.trainer.trainer.Trainer.fast_dev_run`, :paramref:
                        `~pytorch_lightning.trainer.trainer.Trainer.detect_ano
                        maly`, :paramref:`~pytorch_lightning.trainer.trainer.T
                        rainer.profiler`,
                        :meth:`~pytorch_lightning.core.LightningModule.log`, :
                        meth:`~pytorch_lightning.core.LightningModule.log_dict
                        `. (type: bool, default: False)
  --trainer.plugins.help CLASS_PATH_OR_NAME
                        Show the help for the given subclass of
                        {Precision,ClusterEnvironment,CheckpointIO,LayerSync}
                        and exit.
  --trainer.plugins PLUGINS, --trainer.plugins+ PLUGINS
                        Plugins allow modification of core behavior like ddp
                        and amp, and enable custom lightning plugins. Default:
                        ``None``. (type: Union[Precision, ClusterEnvironment,
                        CheckpointIO, LayerSync, list[Union[Precision,
                        ClusterEnvironment, CheckpointIO, LayerSync]], null],
                        default: null, known subclasses:
                        pytorch_lightning.plugins.Precision,
                        pytorch_lightning.plugins.MixedPrecision,
                        pytorch_lightning.plugins.BitsandbytesPrecision,
                        pytorch_lightning.plugins.DeepSpeedPrecision,
                        pytorch_lightning.plugins.DoublePrecision,
                        pytorch_lightning.plugins.FSDPPrecision,
                        pytorch_lightning.plugins.HalfPrecision,
                        pytorch_lightning.plugins.TransformerEnginePrecision,
                        pytorch_lightning.plugins.XLAPrecision, lightning_fabr
                        ic.plugins.environments.KubeflowEnvironment, lightning
                        _fabric.plugins.environments.LightningEnvironment,
                        lightning_fabric.plugins.environments.LSFEnvironment,
                        lightning_fabric.plugins.environments.MPIEnvironment,
                        lightning_fabric.plugins.environments.SLURMEnvironment
                        , lightning_fabric.plugins.environments.TorchElasticEn
                        vironment,
                        lightning_fabric.plugins.environments.XLAEnvironment,
                        lightning_fabric.plugins.TorchCheckpointIO,
                        lightning_fabric.plugins.XLACheckpointIO,
                        multimodal.remote.Mirror,
                        multimodal.checkpoint.AtomicCheckpointIO,
                        pytorch_lightning.plugins.AsyncCheckpointIO,
                        pytorch_lightning.plugins.TorchSyncBatchNorm)
  --trainer.sync_batchnorm {true,false}
                        Synchronize batch norm layers between process
                        groups/whole world. Default: ``False``. (type: bool,
                        default: False)
  --trainer.reload_dataloaders_every_n_epochs RELOAD_DATALOADERS_EVERY_N_EPOCHS
                        Set to a positive integer to reload dataloaders every
                        n epochs. Default: ``0``. (type: int, default: 0)
  --trainer.default_root_dir DEFAULT_ROOT_DIR
                        Default path for logs and weights when no
                        logger/ckpt_callback passed. Default: ``os.getcwd()``.
                        Can be remote file paths such as `s3://mybucket/path`
                        or 'hdfs://path/' (type: Union[str, Path, null],
                        default: null)
  --trainer.enable_autolog_hparams {true,false}
                        Whether to log hyperparameters at the start of a run.
                        Default: ``True``. (type: bool, default: True)
  --trainer.model_registry MODEL_REGISTRY
                        The name of the model being uploaded to Model hub.
                        (type: Optional[str], default: null)

`model` and `loss` as built; AdamW's settings and the schedule's (`multimodal.recipe` documents:
  --model CONFIG        Path to a configuration file.
  --model.model_name MODEL_NAME
                        an open_clip architecture (ViT-B-32, RN50, ...), one
                        of configs/models/ (tiny), a JSON path, or `hf-
                        hub:ORG/REPO` (an open_clip repository on the Hugging
                        Face hub: its weights are the start). (type: str,
                        default: tiny)
  --model.lr LR         peak learning rate, reached after `warmup_steps`.
                        (type: float, default: 0.0005)
  --model.weight_decay WEIGHT_DECAY
                        AdamW weight decay of the weight matrices. (type:
                        float, default: 0.2)
  --model.betas [ITEM,...]
                        AdamW betas. (type: tuple[float, float], default:
                        (0.9, 0.98))
  --model.eps EPS       AdamW epsilon. (type: float, default: 1e-06)
  --model.warmup_steps WARMUP_STEPS
                        optimizer steps of linear warmup. (type: int, default:
                        100)
  --model.min_lr_ratio MIN_LR_RATIO
                        final learning rate of the cosine decay, as a fraction
                        of `lr`. (type: float, default: 0.0)
  --model.val_loss_batch_size VAL_LOSS_BATCH_SIZE
                        held-out images per batch of `val/loss` (the in-batch
                        contrastive loss of each image with its first
                        caption). (type: int, default: 256)
  --model.loss {clip,siglip,coca}
                        the training loss, by name: a class of
                        `multimodal.loss.LOSSES`, which says what it computes,
                        the temperature and bias it starts from and what it
                        needs (docs/training.md compares them): `clip` softmax
                        InfoNCE, `siglip` pairwise sigmoid with a learnable
                        bias, `coca` `clip` plus the captioning loss of a CoCa
                        architecture's caption decoder (coca_ViT-B-32, tiny-
                        coca), ... (type: Literal['clip', 'siglip', 'coca'],
                        default: clip)
  --model.caption_loss_weight CAPTION_LOSS_WEIGHT
                        the weight of the captioning loss of a loss that
                        trains a caption decoder (`coca`; open_clip's default
                        2). (type: float, default: 2.0)
  --model.micro_batches MICRO_BATCHES
                        encode each device's batch in this many gradient-
                        cached chunks: the loss and gradients of the whole
                        batch with the activation memory of one chunk. (type:
                        int, default: 1)
  --model.pretrained PRETRAINED
                        the weights to start from: an open_clip pretrained tag
                        of `model_name` (laion2b_s34b_b79k; `multimodal
                        models` lists them), downloaded into the Hugging Face
                        cache, or a local open_clip state dict
                        (.pt/.bin/.safetensors) or .ckpt. (type: str | null,
                        default: null)
  --model.cache_dir CACHE_DIR
                        where downloaded weights are kept (default: the
                        Hugging Face cache, `$HF_HOME/hub`). (type: str |
                        null, default: null)
  --model.lock_image {true,false}
                        freeze the image tower (LiT, arXiv:2111.07991). (type:
                        bool, default: False)
  --model.lock_image_unlocked_groups LOCK_IMAGE_UNLOCKED_GROUPS
                        with `lock_image`, leave this many last layer groups
                        trainable. (type: int, default: 0)
  --model.lock_text {true,false}
                        freeze the text tower. (type: bool, default: False)
  --model.lock_text_unlocked_layers LOCK_TEXT_UNLOCKED_LAYERS
                        with `lock_text`, leave this many last layers
                        trainable. (type: int, default: 0)
  --model.grad_checkpointing {true,false}
                        recompute both towers' activations in the backward
                        pass. (type: bool, default: False)
  --model.patch_dropout PATCH_DROPOUT
                        fraction of image patches dropped in training (FLIP,
                        arXiv:2212.00794). (type: float, default: 0.0)
  --model.compile {true,false}
                        `torch.compile` both towers (state dict names
                        unchanged). (type: bool, default: False)
  --model.count_flops {true,false}
                        count the model FLOPs per sample at the start of
                        training, to log `train/tflops_per_device` and
                        `train/mfu`. (type: bool, default: True)
  --model.peak_tflops PEAK_TFLOPS
                        the accelerator's peak TFLOP/s for `train/mfu`
                        (default: looked up for known GPUs). (type: float |
                        null, default: null)
  --model.max_nonfinite_steps MAX_NONFINITE_STEPS
                        a step whose loss is NaN or infinite on any rank is
                        skipped (no update) and counted; this many in a row
                        stop the run. (type: int, default: 5)

<class 'multimodal.data.datamodule.ShardDataModule'>:
  --data CONFIG         Path to a configuration file.
  --data.train_shards TRAIN_SHARDS
                        training shards: a folder (ours, or img2dataset's
                        output), a brace pattern
                        (`shard-{000000..000099}.tar`), a glob, `pipe:`
                        commands for object stores, or several of these joined
                        by `::`: one shard list, or with `train_weights` the
                        sources of a weighted mixture. (required, type: str)
  --data.val_shards VAL_SHARDS
                        held-out shards, in the same forms, or a
                        CLIP_benchmark retrieval dataset's folder. (type: str
                        | null, default: null)
  --data.batch_size BATCH_SIZE
                        samples per batch on each device. (type: int, default:
                        256)
  --data.num_workers NUM_WORKERS
                        DataLoader worker processes per device. (type: int,
                        default: 4)
  --data.shuffle_buffer SHUFFLE_BUFFER
                        samples held in the shuffle buffer of each worker (0
                        or 1: no shuffling). (type: int, default: 2000)
  --data.resampled {true,false}
                        draw shards with replacement, endlessly (an epoch is
                        then `num_samples` nominal samples). (type: bool,
                        default: False)
  --data.num_samples NUM_SAMPLES
                        samples per epoch; read from the shards' sizes.json,
                        or img2dataset's *_stats.json, when not given. (type:
                        int | null, default: null)
  --data.train_weights TRAIN_WEIGHTS, --data.train_weights+ TRAIN_WEIGHTS
                        the share of training samples drawn from each
                        `::`-separated source of `train_shards`, e.g. [1, 3]
                        (or "1::3"): each sample's source is drawn with these
                        weights. (type: Union[list[float], str, null],
                        default: null)
  --data.upsampling_factors UPSAMPLING_FACTORS, --data.upsampling_factors+ UPSAMPLING_FACTORS
                        open_clip's `--train-data-upsampling-factors` instead
                        of `train_weights` ([1, 2] or "1::2"): source i's
                        share is its factor times its number of samples.
                        (type: Union[list[float], str, null], default: null)
  --data.image_key IMAGE_KEY
                        the member holding the image (default: the first of
                        jpg, jpeg, png, webp). (type: str | null, default:
                        null)
  --data.text_key TEXT_KEY
                        the member holding the caption, e.g. txt or a second
                        text member (default: json `captions`, else txt).
                        (type: str | null, default: null)
  --data.caption_field CAPTION_FIELD, --data.caption_field+ CAPTION_FIELD
                        json field(s) holding captions (a string or a list of
                        strings each), e.g. caption_blip for a recaptioned
                        set; several fields pool their captions. (type:
                        Union[str, list[str], null], default: null)
  --data.seed SEED      seed of shard order, mixture draws, shuffle buffer and
                        caption choice. (type: int, default: 0)
  --data.synthetic.help
                        Show the help for SyntheticData and exit.
  --data.synthetic SYNTHETIC
                        write this many synthetic scenes into the train/val
                        shard folders if absent. (type: SyntheticData | null,
                        default: null)
  --data.max_bad_fraction MAX_BAD_FRACTION
                        stop the run when more than this fraction of the
                        training samples read (over all ranks, from the first
                        1,000 on) was skipped as bad: broken images, missing
                        captions. (type: float, default: 0.1)
  --data.max_image_pixels MAX_IMAGE_PIXELS
                        skip images that declare more pixels than this, unread
                        (decompression bombs); the default is PIL's warning
                        threshold. null: no limit. (type: int | null, default:
                        89478485)
  --data.decode {auto,cpu,gpu}
                        where training JPEGs are decoded: `cpu` in the
                        DataLoader workers; `gpu` on the training device, the
                        batch's JPEGs together (nvJPEG on CUDA; on a CPU run,
                        the main process), the workers only reading them and
                        drawing their crop boxes; `auto`: `gpu` when training
                        on CUDA. (type: Literal['auto', 'cpu', 'gpu'],
                        default: auto)

Linked arguments:
  model.model_name --> data.model_name [applied on parse]
                        architecture whose transforms and tokenizer to use
                        (linked to `model.model_name`). (type: str)
  model.pretrained --> data.pretrained [applied on parse]
                        the weights the model starts from (linked to
                        `model.pretrained`): a tag's or hub repository's pixel
                        statistics and resize are what its weights were
                        trained with. (type: str | null)
  model.cache_dir --> data.cache_dir [applied on parse]
                        where published weights and configs are kept (linked
                        to `model.cache_dir`). (type: str | null)
"""
