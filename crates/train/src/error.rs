//! Training's error: the library's or candle's (so that core does not depend on candle).

/// Displays as the library's errors do; converts into [`elastica_core::Error`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Core(#[from] elastica_core::Error),
    #[error("training: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("training: {0}")]
    Train(String),
    #[error("{0}")]
    Input(String),
}

impl Error {
    pub fn io(path: impl Into<std::path::PathBuf>, e: std::io::Error) -> Error {
        elastica_core::Error::io(path, e).into()
    }
    pub fn format(path: impl Into<std::path::PathBuf>, msg: impl Into<String>) -> Error {
        elastica_core::Error::format(path, msg).into()
    }
}

/// A candle error as the library's (for core traits implemented over candle tensors).
pub fn candle(e: candle_core::Error) -> elastica_core::Error {
    elastica_core::Error::Train(e.to_string())
}

impl From<Error> for elastica_core::Error {
    fn from(e: Error) -> elastica_core::Error {
        match e {
            Error::Core(e) => e,
            Error::Candle(e) => elastica_core::Error::Train(e.to_string()),
            Error::Train(s) => elastica_core::Error::Train(s),
            Error::Input(s) => elastica_core::Error::Input(s),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
