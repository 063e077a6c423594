//! The words of a training recipe, shared by the stage declarations (which
//! read them from pipeline.yaml) and the model code (which acts on them).
//! Each is a closed set of names: parsed once, then matched, never compared
//! as strings.

pub mod scaling;

use std::fmt;

/// An enum of named choices: `NAMES` in declaration order, `name()`,
/// `FromStr`, and serde as the plain name, so a params struct can hold it
/// (`choice` kind in `params!`). The calling crate needs serde.
#[macro_export]
macro_rules! choices {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name { $($(#[$vdoc])* $variant),+ }

        impl $name {
            /// Every name, as pipeline.yaml spells it.
            pub const NAMES: &'static [&'static str] = &[$($text),+];
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn name(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl std::str::FromStr for $name {
            type Err = $crate::UnknownChoice;
            fn from_str(s: &str) -> Result<Self, $crate::UnknownChoice> {
                match s {
                    $($text => Ok($name::$variant),)+
                    other => Err($crate::UnknownChoice { what: stringify!($name), got: other.to_owned(), names: Self::NAMES }),
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.name())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

/// A name outside a choice's set.
#[derive(Debug, Clone, PartialEq)]
pub struct UnknownChoice {
    pub what: &'static str,
    pub got: String,
    pub names: &'static [&'static str],
}

impl fmt::Display for UnknownChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown {} `{}` (one of: {})", self.what.to_lowercase(), self.got, self.names.join(", "))
    }
}

impl std::error::Error for UnknownChoice {}

choices!(
    /// The segmentation network.
    Arch {
        /// DeepLabV3+ (smp's `DeepLabV3Plus`): ASPP and a decoder with a layer1 skip.
        DeepLabV3Plus = "deeplabv3plus",
        /// The study's plain ResNet segmenter: the encoder at stride 32 and a 1×1 head.
        Resnet = "resnet",
    }
);

choices!(
    /// The ResNet encoder (torchvision layout).
    Encoder { Resnet18 = "resnet18", Resnet34 = "resnet34", Resnet50 = "resnet50" }
);

choices!(
    /// The training loss.
    Loss { CrossEntropy = "ce", Dice = "dice", CeDice = "ce_dice" }
);

choices!(
    /// The optimizer (PyTorch's formulas and defaults).
    Optimizer { Adam = "adam", AdamW = "adamw", Sgd = "sgd", RmsProp = "rmsprop" }
);

choices!(
    /// How stored uint8 slices become model input (see liverseg_model::scaling).
    InputScheme { Fixed = "fixed", Percentile = "percentile", Ct = "ct", Nyul = "nyul" }
);

choices!(
    /// The learning-rate schedule over epochs.
    Schedule { Constant = "constant", Cosine = "cosine", Plateau = "plateau", Poly = "poly" }
);

choices!(
    /// Where the model runs; `auto` is CUDA when available.
    Device { Auto = "auto", Cpu = "cpu", Cuda = "cuda" }
);

choices!(
    /// What model selection and search optimise on the validation split.
    Objective { ValDice = "val_dice", ValLoss = "val_loss" }
);

impl Objective {
    /// The objective as a value to minimise (Dice is negated).
    pub fn to_minimise(self, val_dice: f64, val_loss: f64) -> f64 {
        match self {
            Objective::ValDice => -val_dice,
            Objective::ValLoss => val_loss,
        }
    }

    /// Back from the minimised value to the reported one.
    pub fn reported(self, minimised: f64) -> f64 {
        match self {
            Objective::ValDice => -minimised,
            Objective::ValLoss => minimised,
        }
    }

    pub fn higher_is_better(self) -> bool {
        self == Objective::ValDice
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_list_the_choices() {
        for a in Arch::ALL {
            assert_eq!(a.name().parse::<Arch>().unwrap(), *a);
        }
        let err = "unet".parse::<Arch>().unwrap_err().to_string();
        assert_eq!(err, "unknown arch `unet` (one of: deeplabv3plus, resnet)");
        let l: Loss = serde_json_like("ce_dice");
        assert_eq!(l, Loss::CeDice);
    }

    /// Deserialize from a plain string through serde's value machinery.
    fn serde_json_like<T: serde::de::DeserializeOwned>(s: &str) -> T {
        use serde::de::IntoDeserializer;
        let d: serde::de::value::StrDeserializer<serde::de::value::Error> = s.into_deserializer();
        T::deserialize(d).unwrap()
    }
}
