//! Models, written once against the backend seam.

pub mod language_model;
pub mod megabyte;
pub mod megalodon;
pub mod params;
pub mod transformer;

pub use language_model::{Decoder, LanguageModel, ModelShape};

/// Run `$body` with `$m` bound to the model a [`crate::config::ModelConfig`] describes, so
/// code generic over [`LanguageModel`] is written once for every family.
#[macro_export]
macro_rules! with_model {
    ($cfg:expr, |$m:ident| $body:expr) => {
        match $cfg {
            $crate::config::ModelConfig::Megabyte(c) => {
                let $m = $crate::model::megabyte::Megabyte::new(c);
                $body
            }
            $crate::config::ModelConfig::Megalodon(c) => {
                let $m = $crate::model::megalodon::Megalodon::new(c);
                $body
            }
        }
    };
}
