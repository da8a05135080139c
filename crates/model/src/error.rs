//! Configuration errors that say where (file, line, resource, field) and why.

use std::fmt;

/// One problem found in configuration input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file (or other source label) the document came from.
    pub file: Option<String>,
    /// 1-based line in that file, where known.
    pub line: Option<usize>,
    /// `Kind namespace/name` of the resource, where known.
    pub resource: Option<String>,
    /// The field path inside the document, e.g. `spec.rules[0].backendRefs[1].weight`.
    pub field: Option<String>,
    /// What is wrong.
    pub reason: String,
}

impl ConfigError {
    /// A problem with no location yet; callers add what they know.
    pub fn new(reason: impl Into<String>) -> Self {
        ConfigError {
            file: None,
            line: None,
            resource: None,
            field: None,
            reason: reason.into(),
        }
    }

    /// Sets the field path.
    pub fn field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    /// Sets the resource label (`Kind namespace/name`).
    pub fn resource(mut self, resource: impl Into<String>) -> Self {
        self.resource = Some(resource.into());
        self
    }

    /// Sets the source file and line.
    pub fn at(mut self, file: impl Into<String>, line: Option<usize>) -> Self {
        self.file = Some(file.into());
        self.line = line;
        self
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut sep = "";
        if let Some(file) = &self.file {
            write!(f, "{file}")?;
            if let Some(line) = self.line {
                write!(f, ":{line}")?;
            }
            sep = ": ";
        }
        if let Some(res) = &self.resource {
            write!(f, "{sep}{res}")?;
            sep = ": ";
        }
        if let Some(field) = &self.field {
            write!(f, "{sep}{field}")?;
            sep = ": ";
        }
        write!(f, "{sep}{}", self.reason)
    }
}

impl std::error::Error for ConfigError {}

/// Every problem found in one apply; an apply with any problem takes nothing.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    /// True when no problem was recorded.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Records a problem.
    pub fn push(&mut self, e: ConfigError) {
        self.0.push(e);
    }

    /// `Ok(v)` when nothing was recorded, else the problems.
    pub fn into_result<T>(self, v: T) -> Result<T, ConfigErrors> {
        if self.0.is_empty() { Ok(v) } else { Err(self) }
    }
}

impl From<ConfigError> for ConfigErrors {
    fn from(e: ConfigError) -> Self {
        ConfigErrors(vec![e])
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}
