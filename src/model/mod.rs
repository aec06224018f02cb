//! Models, written once against the backend seam.

pub mod megabyte;
pub mod params;
pub mod transformer;
