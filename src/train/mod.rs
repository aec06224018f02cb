//! Training: byte corpora and batching, the learning-rate schedule, crash-safe checkpoints,
//! the loss-curve plot, evaluation (bits per byte) and the trainer loop.

pub mod checkpoint;
pub mod data;
pub mod eval;
pub mod plot;
pub mod schedule;
pub mod trainer;

pub use checkpoint::{
    load, load_model_only, save, save_with, Checkpoint, CheckpointError, HostTensor, LogPoint,
    OptimizerState, SaveOptions, TrainerState,
};
pub use data::{ByteCorpus, CorpusPart, DataError, DataSplit};
pub use plot::{write_loss_plot, PlotError};
pub use schedule::{LrSchedule, ScheduleError};
