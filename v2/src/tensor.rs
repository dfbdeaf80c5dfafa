//! [`Tensor`]: one named tensor in the raw layout that both the wire's binary tensor data and the
//! Wasm guest use: little-endian, row-major; for `BYTES`, each element is a 4-byte little-endian
//! length followed by that many bytes.

use super::{Result, Role, V2Error};
use sophon_sdk::Datatype;

/// A named tensor with its data in the raw layout described in the module docs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tensor {
    pub name: String,
    pub datatype: Datatype,
    pub shape: Vec<u64>,
    pub data: Vec<u8>,
}

/// The number of elements of a shape (1 for a scalar), or `None` if it overflows 64 bits.
pub fn element_count(shape: &[u64]) -> Option<u64> {
    shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))
}

impl Tensor {
    /// A tensor from its parts, unchecked; [`Tensor::check_data`] checks them.
    pub fn new(
        name: impl Into<String>,
        datatype: Datatype,
        shape: Vec<u64>,
        data: Vec<u8>,
    ) -> Self {
        Tensor {
            name: name.into(),
            datatype,
            shape,
            data,
        }
    }

    /// The number of elements the shape says this tensor has.
    pub fn element_count(&self) -> Result<u64> {
        element_count(&self.shape)
            .ok_or_else(|| V2Error::Malformed(overflow_message(&self.name, &self.shape)))
    }

    /// An `FP32` tensor.
    pub fn from_f32(name: impl Into<String>, shape: Vec<u64>, values: &[f32]) -> Self {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Tensor::new(name, Datatype::Fp32, shape, data)
    }

    /// An `INT64` tensor.
    pub fn from_i64(name: impl Into<String>, shape: Vec<u64>, values: &[i64]) -> Self {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Tensor::new(name, Datatype::Int64, shape, data)
    }

    /// A `BYTES` tensor, framing each element with its 4-byte little-endian length.
    /// Fails only for an element of 4 GiB or more.
    pub fn from_bytes_elements<B: AsRef<[u8]>>(
        name: impl Into<String>,
        shape: Vec<u64>,
        elements: &[B],
    ) -> Result<Self> {
        let name = name.into();
        let total: usize = elements.iter().map(|e| e.as_ref().len() + 4).sum();
        let mut data = Vec::with_capacity(total);
        for element in elements {
            push_bytes_element(&mut data, element.as_ref())
                .map_err(|reason| V2Error::Malformed(format!("tensor '{name}': {reason}")))?;
        }
        Ok(Tensor::new(name, Datatype::Bytes, shape, data))
    }

    /// The values of an `FP32` tensor; `None` for another datatype or a ragged length.
    pub fn to_f32(&self) -> Option<Vec<f32>> {
        self.fixed_width::<4>(Datatype::Fp32)
            .map(|c| c.map(f32::from_le_bytes).collect())
    }

    /// The values of an `INT64` tensor; `None` for another datatype or a ragged length.
    pub fn to_i64(&self) -> Option<Vec<i64>> {
        self.fixed_width::<8>(Datatype::Int64)
            .map(|c| c.map(i64::from_le_bytes).collect())
    }

    fn fixed_width<const N: usize>(
        &self,
        want: Datatype,
    ) -> Option<impl Iterator<Item = [u8; N]> + '_> {
        if self.datatype != want || !self.data.len().is_multiple_of(N) {
            return None;
        }
        Some(
            self.data
                .chunks_exact(N)
                .filter_map(|c| <[u8; N]>::try_from(c).ok()),
        )
    }

    /// The elements of a `BYTES` tensor, checking the length framing.
    pub fn bytes_elements(&self) -> Result<Vec<&[u8]>> {
        BytesElements::new(&self.data)
            .collect::<Result<Vec<_>, String>>()
            .map_err(|reason| V2Error::Malformed(format!("BYTES tensor '{}': {reason}", self.name)))
    }

    /// Checks that the data holds exactly as many elements as the shape says: for fixed-width
    /// datatypes the byte length, for `BYTES` the framing (no trailing bytes). `role` words the
    /// error, which is a [`V2Error::DataSize`].
    pub fn check_data(&self, role: Role) -> Result<()> {
        check_data(self.datatype, &self.shape, &self.data, role, &self.name)
    }
}

/// [`Tensor::check_data`] on borrowed parts, so data can be checked before it is copied.
pub(crate) fn check_data(
    datatype: Datatype,
    shape: &[u64],
    data: &[u8],
    role: Role,
    name: &str,
) -> Result<()> {
    let fail = |reason: String| {
        Err(V2Error::DataSize {
            role,
            name: name.to_string(),
            reason,
        })
    };
    let Some(count) = element_count(shape) else {
        return fail(format!(
            "shape {shape:?} has more elements than fit in 64 bits"
        ));
    };
    match datatype.element_size() {
        Some(size) => match count.checked_mul(size as u64) {
            Some(want) if want == data.len() as u64 => Ok(()),
            Some(want) => fail(format!(
                "shape {shape:?} of {datatype} needs {want} bytes of data but there are {}",
                data.len()
            )),
            None => fail(format!(
                "shape {shape:?} needs more bytes than fit in 64 bits"
            )),
        },
        None => match count_bytes_elements(data) {
            Ok(got) if got == count => Ok(()),
            Ok(got) => fail(format!(
                "shape {shape:?} needs {count} BYTES elements but there are {got}"
            )),
            Err(reason) => fail(reason),
        },
    }
}

pub(crate) fn overflow_message(name: &str, shape: &[u64]) -> String {
    format!("tensor '{name}': shape {shape:?} has more elements than fit in 64 bits")
}

/// Appends one framed `BYTES` element.
pub(crate) fn push_bytes_element(data: &mut Vec<u8>, element: &[u8]) -> Result<(), String> {
    let len = u32::try_from(element.len()).map_err(|_| {
        format!(
            "a BYTES element of {} bytes is over the 4 GiB limit",
            element.len()
        )
    })?;
    data.extend_from_slice(&len.to_le_bytes());
    data.extend_from_slice(element);
    Ok(())
}

/// Counts the framed `BYTES` elements of `data` without allocating; errors on broken framing.
pub(crate) fn count_bytes_elements(data: &[u8]) -> Result<u64, String> {
    let mut count = 0u64;
    for element in BytesElements::new(data) {
        element?;
        count += 1;
    }
    Ok(count)
}

/// Iterator over the framed elements of a `BYTES` buffer; yields an error (then stops) on a
/// truncated length prefix or element.
pub(crate) struct BytesElements<'a> {
    rest: &'a [u8],
    index: u64,
    failed: bool,
}

impl<'a> BytesElements<'a> {
    pub(crate) fn new(data: &'a [u8]) -> Self {
        BytesElements {
            rest: data,
            index: 0,
            failed: false,
        }
    }
}

impl<'a> Iterator for BytesElements<'a> {
    type Item = Result<&'a [u8], String>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() || self.failed {
            return None;
        }
        let index = self.index;
        self.index += 1;
        let parsed = self.rest.split_first_chunk::<4>().and_then(|(len, tail)| {
            let len = usize::try_from(u32::from_le_bytes(*len)).ok()?;
            (len <= tail.len()).then(|| tail.split_at(len))
        });
        match parsed {
            Some((element, tail)) => {
                self.rest = tail;
                Some(Ok(element))
            }
            None => {
                self.failed = true;
                Some(Err(format!(
                    "element {index} is truncated: each BYTES element must be a 4-byte \
                     little-endian length followed by that many bytes"
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn element_counts() {
        assert_eq!(element_count(&[]), Some(1));
        assert_eq!(element_count(&[2, 3, 4]), Some(24));
        assert_eq!(element_count(&[0, 7]), Some(0));
        assert_eq!(element_count(&[u64::MAX, 2]), None);
        let t = Tensor::new("x", Datatype::Fp32, vec![1 << 40, 1 << 40], vec![]);
        let err = t.element_count().expect_err("overflow");
        assert!(
            err.to_string()
                .contains("more elements than fit in 64 bits"),
            "{err}"
        );
    }

    #[test]
    fn f32_and_i64_helpers_round_trip() {
        let t = Tensor::from_f32("x", vec![3], &[1.0, -2.5, 3.25]);
        assert_eq!(t.data.len(), 12);
        assert_eq!(t.to_f32(), Some(vec![1.0, -2.5, 3.25]));
        assert_eq!(t.to_i64(), None);
        let t = Tensor::from_i64("y", vec![2], &[-1, i64::MAX]);
        assert_eq!(t.to_i64(), Some(vec![-1, i64::MAX]));
        assert!(t.check_data(Role::Input).is_ok());
    }

    #[test]
    fn bytes_framing() {
        let t =
            Tensor::from_bytes_elements("s", vec![3], &["ab", "", "xyz"]).expect("small elements");
        assert_eq!(t.data, b"\x02\0\0\0ab\0\0\0\0\x03\0\0\0xyz");
        assert_eq!(
            t.bytes_elements().expect("framed"),
            vec![&b"ab"[..], b"", b"xyz"]
        );
        assert!(t.check_data(Role::Input).is_ok());

        let mut truncated = t.clone();
        truncated.data.pop();
        let err = truncated.bytes_elements().expect_err("truncated");
        assert!(err.to_string().contains("element 2 is truncated"), "{err}");
        let err = truncated.check_data(Role::Input).expect_err("truncated");
        assert!(
            err.to_string()
                .starts_with("input 's': element 2 is truncated"),
            "{err}"
        );

        let short_prefix = Tensor::new("s", Datatype::Bytes, vec![1], vec![1, 0]);
        assert!(short_prefix.bytes_elements().is_err());

        let wrong_count = Tensor::new("s", Datatype::Bytes, vec![2], t.data.clone());
        let err = wrong_count
            .check_data(Role::Output)
            .expect_err("3 elements for shape [2]");
        assert_eq!(
            err.to_string(),
            "output 's': shape [2] needs 2 BYTES elements but there are 3"
        );
    }

    #[test]
    fn check_data_of_fixed_width() {
        let t = Tensor::new("x", Datatype::Fp16, vec![2, 2], vec![0; 8]);
        assert!(t.check_data(Role::Input).is_ok());
        let t = Tensor::new("x", Datatype::Fp16, vec![2, 2], vec![0; 7]);
        let err = t.check_data(Role::Input).expect_err("7 bytes");
        assert_eq!(
            err.to_string(),
            "input 'x': shape [2, 2] of FP16 needs 8 bytes of data but there are 7"
        );
        let t = Tensor::new("x", Datatype::Fp64, vec![1 << 62], vec![]);
        assert!(t.check_data(Role::Input).is_err());
    }
}
