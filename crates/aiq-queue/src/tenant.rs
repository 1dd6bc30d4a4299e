//! Who a job is for: the subscription tier the queue orders by and the organisation it
//! round-robins inside a tier. Each is built only through `parse`/`FromStr`/`TryFrom`, so a
//! value that exists is a valid one: a `Tier` is one of the six, an `OrganizationId` is a UUID.
//! aiq's `domain` re-exports both.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A customer's subscription tier, highest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    EnterprisePlus,
    Enterprise,
    ProfessionalAgency,
    GrowthTeam,
    SoloProfessional,
    Trial,
}

impl Tier {
    /// All tiers, highest first. The index is the product plan's priority minus one.
    pub const ALL: [Tier; 6] = [
        Tier::EnterprisePlus,
        Tier::Enterprise,
        Tier::ProfessionalAgency,
        Tier::GrowthTeam,
        Tier::SoloProfessional,
        Tier::Trial,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Tier::EnterprisePlus => "enterprise_plus",
            Tier::Enterprise => "enterprise",
            Tier::ProfessionalAgency => "professional_agency",
            Tier::GrowthTeam => "growth_team",
            Tier::SoloProfessional => "solo_professional",
            Tier::Trial => "trial",
        }
    }

    /// Position in [`Tier::ALL`]: 0 for enterprise_plus, 5 for trial.
    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "unknown tier {0:?}: expected one of enterprise_plus, enterprise, professional_agency, growth_team, solo_professional, trial"
)]
pub struct UnknownTier(pub String);

impl FromStr for Tier {
    type Err = UnknownTier;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Tier::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| UnknownTier(s.to_owned()))
    }
}

/// The organisation (customer account) a job is billed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct OrganizationId(uuid::Uuid);

impl OrganizationId {
    pub fn parse(s: &str) -> Result<Self, InvalidOrganizationId> {
        uuid::Uuid::parse_str(s)
            .map(Self)
            .map_err(|_| InvalidOrganizationId(s.to_owned()))
    }

    /// Only the canonical form enqueue.lua takes: 8-4-4-4-12 lower-case hex digits (the
    /// operator's commands name an organisation exactly as its rows and keys hold it).
    pub fn parse_canonical(s: &str) -> Result<Self, InvalidOrganizationId> {
        match Self::parse(s) {
            Ok(id) if id.to_string() == s => Ok(id),
            _ => Err(InvalidOrganizationId(s.to_owned())),
        }
    }

    pub fn as_uuid(&self) -> uuid::Uuid {
        self.0
    }
}

impl From<uuid::Uuid> for OrganizationId {
    fn from(u: uuid::Uuid) -> Self {
        Self(u)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("organization_id {0:?} is not a UUID")]
pub struct InvalidOrganizationId(pub String);

impl TryFrom<String> for OrganizationId {
    type Error = InvalidOrganizationId;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<OrganizationId> for String {
    fn from(o: OrganizationId) -> String {
        o.0.to_string()
    }
}

impl fmt::Display for OrganizationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_tier_round_trips_through_its_wire_name() {
        for t in Tier::ALL {
            assert_eq!(t.as_str().parse::<Tier>().unwrap(), t);
        }
        assert_eq!(Tier::Trial.index(), 5);
        assert!("gold".parse::<Tier>().is_err());
    }

    #[test]
    fn organization_ids_must_be_uuids() {
        assert!(OrganizationId::parse("not-a-uuid").is_err());
        let id = OrganizationId::parse("0b6f1b3e-2a55-4a6e-9a43-2f6f6f1b2c3d").unwrap();
        assert_eq!(id.to_string(), "0b6f1b3e-2a55-4a6e-9a43-2f6f6f1b2c3d");
    }

    #[test]
    fn a_canonical_organization_id_is_lower_case_with_hyphens_only() {
        let s = "0b6f1b3e-2a55-4a6e-9a43-2f6f6f1b2c3d";
        assert_eq!(OrganizationId::parse_canonical(s).unwrap().to_string(), s);
        for bad in [
            "0B6F1B3E-2A55-4A6E-9A43-2F6F6F1B2C3D",
            "0b6f1b3e2a554a6e9a432f6f6f1b2c3d",
            "{0b6f1b3e-2a55-4a6e-9a43-2f6f6f1b2c3d}",
            "urn:uuid:0b6f1b3e-2a55-4a6e-9a43-2f6f6f1b2c3d",
            "",
        ] {
            assert!(OrganizationId::parse_canonical(bad).is_err(), "{bad}");
        }
    }
}
