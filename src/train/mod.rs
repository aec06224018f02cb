//! Training utilities that do not depend on a model: byte corpora and batching, the learning-rate
//! schedule, crash-safe checkpoints and the loss-curve plot.

pub mod checkpoint;
pub mod data;
pub mod plot;
pub mod schedule;

pub use checkpoint::{
    load, load_model_only, save, save_with, Checkpoint, CheckpointError, HostTensor, LogPoint,
    OptimizerState, SaveOptions, TrainerState,
};
pub use data::{ByteCorpus, CorpusPart, DataError, DataSplit};
pub use plot::{write_loss_plot, PlotError};
pub use schedule::{LrSchedule, ScheduleError};
